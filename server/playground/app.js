// The playground page: lists the models (POST /v1/models:list), generates through the native
// JSON API (POST /v1/generate) and shows each image with its seed and the request's server-side
// timings. Talks to the server that served the page only; no external script, style or font.
//
// The API key, when one is typed, lives in this tab's sessionStorage only and goes out as
// `Authorization: Bearer KEY` on every API call (the page itself needs none).
"use strict";

const KEY_STORAGE = "dmdserve.apiKey";

const $ = (id) => document.getElementById(id);

// The request headers of an API call.
function apiHeaders() {
  const headers = {"Content-Type": "application/json"};
  const key = $("key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

// POSTs `body` as JSON to `path`; resolves to the parsed response, rejects with an Error whose
// message is the server's (and whose `status` is the HTTP status) otherwise.
async function callApi(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: apiHeaders(),
    body: JSON.stringify(body),
    cache: "no-store",
    credentials: "omit",
  });
  let json = null;
  try {
    json = await response.json();
  } catch (e) {
    // Not JSON: reported below by its HTTP status.
  }
  if (!response.ok) {
    const error = json && json.error ? json.error : {};
    const reason = error.message || `HTTP ${response.status}`;
    const failure = new Error(error.status ? `${error.status}: ${reason}` : reason);
    failure.status = response.status;
    throw failure;
  }
  return json;
}

function showStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

// A failed call: 401 opens the API key field.
function showFailure(what, error) {
  showStatus(`${what} failed: ${error.message}`, true);
  if (error.status === 401) {
    $("auth").open = true;
    $("key").focus();
  }
}

async function loadModels() {
  const select = $("model");
  try {
    const response = await callApi("/v1/models:list", {});
    select.replaceChildren();
    for (const model of response.models) {
      const option = document.createElement("option");
      option.value = model.name;
      const size = `${model.width}×${model.height}`;
      option.textContent = `${model.name} (${size}${model.isDefault ? ", default" : ""})`;
      option.dataset.maxImages = model.maxImagesPerRequest;
      option.selected = model.isDefault;
      select.append(option);
    }
    limitCount();
    showStatus(`${response.models.length} model(s) served.`);
  } catch (error) {
    showFailure("Listing the models", error);
  }
}

// Caps the image count at the selected model's max_images_per_request.
function limitCount() {
  const option = $("model").selectedOptions[0];
  if (option && Number(option.dataset.maxImages) > 0) $("count").max = option.dataset.maxImages;
}

function seconds(value) {
  const s = Number(value || 0);
  return s < 1 ? `${(s * 1000).toFixed(1)} ms` : `${s.toFixed(2)} s`;
}

function showTimings(response, roundTripMs) {
  const t = response.timings || {};
  const entries = [
    ["model", response.model],
    ["queue", seconds(t.queueSeconds)],
    ["text encoder", seconds(t.textEncoderSeconds)],
    ["generator", seconds(t.generatorSeconds)],
    ["decoder", seconds(t.decoderSeconds)],
    ["PNG encode", seconds(t.encodeSeconds)],
    ["total", seconds(t.totalSeconds)],
    ["batch size", String(t.batchSize || 0)],
    ["round trip (browser)", `${roundTripMs.toFixed(1)} ms`],
  ];
  if (response.truncatedTokens > 0) {
    entries.push(["prompt tokens cut", String(response.truncatedTokens)]);
  }
  const list = $("timing-list");
  list.replaceChildren();
  for (const [name, value] of entries) {
    const item = document.createElement("div");
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = name;
    dd.textContent = value;
    item.append(dt, dd);
    list.append(item);
  }
  $("timings").hidden = false;
}

function showImages(response, prompt) {
  const results = $("results");
  results.replaceChildren();
  for (const image of response.images) {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = `data:image/png;base64,${image.data}`;
    img.alt = `${prompt} (seed ${image.seed})`;
    img.width = image.width;
    img.height = image.height;
    img.dataset.seed = image.seed;
    const caption = document.createElement("figcaption");
    const seed = document.createElement("span");
    seed.className = "seed";
    seed.textContent = `seed ${image.seed}`;
    const size = document.createElement("span");
    size.textContent = `#${image.index} · ${image.width}×${image.height}`;
    caption.append(seed, size);
    figure.append(img, caption);
    results.append(figure);
  }
}

async function generate(event) {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt) return;
  const request = {
    prompt,
    model: $("model").value,
    numImages: Number($("count").value) || 1,
    encoding: "IMAGE_ENCODING_PNG",
  };
  const seed = $("seed").value.trim();
  if (seed) request.seed = seed;  // a decimal string: uint64 does not fit a JS number
  const button = $("generate");
  button.disabled = true;
  showStatus("Generating…");
  const started = performance.now();
  try {
    const response = await callApi("/v1/generate", request);
    const roundTripMs = performance.now() - started;
    showImages(response, prompt);
    showTimings(response, roundTripMs);
    showStatus(`${response.images.length} image(s) from ${response.model}.`);
  } catch (error) {
    showFailure("Generating", error);
  } finally {
    button.disabled = false;
  }
}

function init() {
  const key = $("key");
  key.value = sessionStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("change", () => {
    const value = key.value.trim();
    if (value) {
      sessionStorage.setItem(KEY_STORAGE, value);
    } else {
      sessionStorage.removeItem(KEY_STORAGE);
    }
    loadModels();
  });
  $("model").addEventListener("change", limitCount);
  $("form").addEventListener("submit", generate);
  loadModels();
}

document.addEventListener("DOMContentLoaded", init);
