// The official OpenAI Node SDK (pinned to 4.x, the line that supports Debian 12's Node.js 18)
// against dmdserve's OpenAI-compatible HTTP API. Run by
// tests/integration/test_openai_node.py, which starts the server and checks the report this
// prints: one JSON object with what each call returned or threw, exactly as the SDK saw it.
//
// Environment: DMDSERVE_BASE_URL (http://HOST:PORT/v1), DMDSERVE_API_KEY (an unlimited key),
// DMDSERVE_LIMITED_KEY (a key limited to 1 image per second), DMDSERVE_MODEL_ALIAS.
import OpenAI from "openai";

const baseURL = process.env.DMDSERVE_BASE_URL;
const client = (apiKey) => new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 120_000 });
const good = client(process.env.DMDSERVE_API_KEY);

// A response header from an SDK error: a Headers object in some SDK versions, a plain object in
// the pinned one.
function header(headers, name) {
  if (!headers) return null;
  return (typeof headers.get === "function" ? headers.get(name) : headers[name]) ?? null;
}

// What a failed call threw, as the SDK classified it.
async function failure(call) {
  try {
    await call();
    return { class: null };
  } catch (err) {
    return {
      class: err.constructor.name,
      status: err.status ?? null,
      code: err.code ?? null,
      param: err.param ?? null,
      type: err.type ?? null,
      message: err.message,
      retryAfter: header(err.headers, "retry-after"),
    };
  }
}

const images = await good.images.generate({
  model: process.env.DMDSERVE_MODEL_ALIAS,
  prompt: "a photo of a sneaker",
  n: 2,
  size: "64x32",
  response_format: "b64_json",
  seed: 7, // dmdserve's extension; the SDK sends unknown parameters as they are
});
const modelIds = [];
for await (const model of good.models.list()) modelIds.push(model.id);

const limited = client(process.env.DMDSERVE_LIMITED_KEY);
// The key's whole 2-image burst, then at once the same again: refused until it refills (2 s).
const burst = await failure(() => limited.images.generate({ prompt: "a bag", n: 2 }));
const overRate = await failure(() => limited.images.generate({ prompt: "a bag", n: 2 }));
const report = {
  images: {
    created: images.created,
    seeds: images.data.map((d) => d.seed),
    b64: images.data.map((d) => d.b64_json),
  },
  modelIds,
  errors: {
    unknownModel: await failure(() => good.images.generate({ model: "dall-e-3", prompt: "x" })),
    badSize: await failure(() => good.images.generate({ prompt: "x", size: "48x48" })),
    urlFormat: await failure(() => good.images.generate({ prompt: "x", response_format: "url" })),
    emptyPrompt: await failure(() => good.images.generate({ prompt: "" })),
    wrongKey: await failure(() => client("not-a-key").images.generate({ prompt: "x" })),
    withinBurst: burst,
    overRate,
  },
};
process.stdout.write(JSON.stringify(report) + "\n");
