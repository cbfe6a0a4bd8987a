#include "client/output.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace dmdserve::client {
namespace {

nlohmann::ordered_json TimingsJson(const v1::Timings& t) {
  return {{"queue_seconds", t.queue_seconds()},
          {"text_encoder_seconds", t.text_encoder_seconds()},
          {"generator_seconds", t.generator_seconds()},
          {"decoder_seconds", t.decoder_seconds()},
          {"encode_seconds", t.encode_seconds()},
          {"total_seconds", t.total_seconds()},
          {"batch_size", t.batch_size()}};
}

std::string Size(int width, int height) { return absl::StrCat(width, "x", height); }

}  // namespace

std::string ImageFileName(absl::string_view prefix, int index, uint64_t seed,
                          v1::ImageEncoding encoding) {
  return absl::StrCat(prefix, "-", index, "-seed", seed,
                      encoding == v1::IMAGE_ENCODING_RAW ? ".raw" : ".png");
}

v1::GenerateResponse AssembleStreamResponse(std::vector<v1::GeneratedImage> images) {
  v1::GenerateResponse response;
  if (images.empty()) return response;
  std::sort(images.begin(), images.end(),
            [](const v1::GeneratedImage& a, const v1::GeneratedImage& b) {
              return a.index() < b.index();
            });
  const v1::GeneratedImage* last = &images.front();
  double queue_seconds = images.front().timings().queue_seconds();
  double encode_seconds = 0;
  int batch_size = 0;
  for (const v1::GeneratedImage& image : images) {
    const v1::Timings& t = image.timings();
    if (t.total_seconds() > last->timings().total_seconds()) last = &image;
    queue_seconds = std::min(queue_seconds, t.queue_seconds());
    encode_seconds += t.encode_seconds();
    batch_size = std::max(batch_size, t.batch_size());
  }
  response.set_model(images.front().model());
  response.set_request_id(images.front().request_id());
  response.set_truncated_tokens(images.front().truncated_tokens());
  v1::Timings* timings = response.mutable_timings();
  *timings = last->timings();
  timings->set_queue_seconds(queue_seconds);
  timings->set_encode_seconds(encode_seconds);
  timings->set_batch_size(batch_size);
  for (v1::GeneratedImage& image : images) *response.add_images() = std::move(image);
  return response;
}

nlohmann::ordered_json GenerateJson(const v1::GenerateResponse& response,
                                    const std::vector<std::string>& paths, double client_seconds) {
  nlohmann::ordered_json images = nlohmann::ordered_json::array();
  for (int i = 0; i < response.images_size(); ++i) {
    const v1::GeneratedImage& image = response.images(i);
    nlohmann::ordered_json entry = {{"index", image.index()},       {"seed", image.seed()},
                                    {"width", image.width()},       {"height", image.height()},
                                    {"channels", image.channels()}, {"path", paths.at(i)}};
    if (image.has_timings()) entry["timings"] = TimingsJson(image.timings());
    images.push_back(std::move(entry));
  }
  nlohmann::ordered_json timings = TimingsJson(response.timings());
  timings["client_seconds"] = client_seconds;
  return {{"model", response.model()},
          {"request_id", response.request_id()},
          {"images", std::move(images)},
          {"timings", std::move(timings)},
          {"truncated_tokens", response.truncated_tokens()}};
}

std::string GenerateText(const v1::GenerateResponse& response,
                         const std::vector<std::string>& paths, double client_seconds) {
  std::string text = absl::StrCat("model: ", response.model());
  if (!response.request_id().empty())
    absl::StrAppend(&text, "  request_id: ", response.request_id());
  text += "\n";
  std::vector<std::vector<std::string>> rows;
  for (int i = 0; i < response.images_size(); ++i) {
    const v1::GeneratedImage& image = response.images(i);
    rows.push_back({absl::StrCat("image ", image.index()), absl::StrCat("seed ", image.seed()),
                    absl::StrCat(Size(image.width(), image.height()), "x", image.channels()),
                    paths.at(i)});
  }
  text += FormatTable(rows);
  const v1::Timings& t = response.timings();
  absl::StrAppendFormat(&text,
                        "timings: queue %.3f s, text encoder %.3f s, generator %.3f s, decoder "
                        "%.3f s, encode %.3f s, total %.3f s (batch of %d); round trip %.3f s\n",
                        t.queue_seconds(), t.text_encoder_seconds(), t.generator_seconds(),
                        t.decoder_seconds(), t.encode_seconds(), t.total_seconds(), t.batch_size(),
                        client_seconds);
  return text;
}

nlohmann::ordered_json ModelsJson(const v1::ListModelsResponse& response) {
  nlohmann::ordered_json models = nlohmann::ordered_json::array();
  for (const v1::ModelInfo& m : response.models()) {
    nlohmann::ordered_json sizes = nlohmann::ordered_json::array();
    for (const v1::ImageSize& size : m.supported_sizes()) {
      sizes.push_back({{"width", size.width()}, {"height", size.height()}});
    }
    nlohmann::ordered_json batching = nlohmann::ordered_json::array();
    for (const v1::DeviceBatching& b : m.batching()) {
      nlohmann::ordered_json measured = nlohmann::ordered_json::array();
      for (const v1::BatchThroughput& t : b.measured()) {
        measured.push_back(
            {{"batch_size", t.batch_size()}, {"images_per_second", t.images_per_second()}});
      }
      batching.push_back({{"device", b.device()},
                          {"max_batch_size", b.max_batch_size()},
                          {"measured", std::move(measured)}});
    }
    models.push_back({{"name", m.name()},
                      {"is_default", m.is_default()},
                      {"ready", m.ready()},
                      {"width", m.width()},
                      {"height", m.height()},
                      {"channels", m.channels()},
                      {"steps", m.steps()},
                      {"max_images_per_request", m.max_images_per_request()},
                      {"max_tokens", m.max_tokens()},
                      {"supported_sizes", std::move(sizes)},
                      {"batching", std::move(batching)},
                      {"description", m.description()}});
  }
  return {{"models", std::move(models)}};
}

std::string ModelsTable(const v1::ListModelsResponse& response) {
  std::vector<std::vector<std::string>> rows = {{"NAME", "DEFAULT", "READY", "SIZE", "CHANNELS",
                                                 "STEPS", "MAX_IMAGES", "MAX_TOKENS", "SIZES",
                                                 "MAX_BATCH", "DESCRIPTION"}};
  for (const v1::ModelInfo& m : response.models()) {
    std::vector<std::string> sizes;
    for (const v1::ImageSize& size : m.supported_sizes()) {
      sizes.push_back(Size(size.width(), size.height()));
    }
    std::vector<std::string> batching;  // "cpu:4"
    for (const v1::DeviceBatching& b : m.batching()) {
      batching.push_back(absl::StrCat(b.device(), ":", b.max_batch_size()));
    }
    rows.push_back({m.name(), m.is_default() ? "yes" : "no", m.ready() ? "yes" : "no",
                    Size(m.width(), m.height()), absl::StrCat(m.channels()),
                    absl::StrCat(m.steps()), absl::StrCat(m.max_images_per_request()),
                    absl::StrCat(m.max_tokens()), absl::StrJoin(sizes, ","),
                    batching.empty() ? "-" : absl::StrJoin(batching, ","), m.description()});
  }
  return FormatTable(rows);
}

nlohmann::ordered_json TokenizeJson(const v1::TokenizeResponse& response) {
  return {
      {"ids", std::vector<int32_t>(response.ids().begin(), response.ids().end())},
      {"tokens", std::vector<std::string>(response.tokens().begin(), response.tokens().end())},
      {"input_ids", std::vector<int32_t>(response.input_ids().begin(), response.input_ids().end())},
      {"truncated_tokens", response.truncated_tokens()}};
}

std::string TokenizeText(const v1::TokenizeResponse& response) {
  std::string text = absl::StrCat("model: ", response.model(), "\n");
  std::vector<std::vector<std::string>> rows = {{"#", "ID", "TOKEN"}};
  for (int i = 0; i < response.ids_size(); ++i) {
    rows.push_back({absl::StrCat(i), absl::StrCat(response.ids(i)),
                    i < response.tokens_size() ? response.tokens(i) : ""});
  }
  text += FormatTable(rows);
  const int kept = response.ids_size() - response.truncated_tokens();
  const int padding = response.input_ids_size() - kept - 2;
  absl::StrAppend(&text, "input_ids: ", response.input_ids_size(), " ids (BOS, ", kept,
                  " text ids, EOS, ", std::max(padding, 0), " padding)\n");
  return text;
}

std::string TruncationWarning(int truncated_tokens) {
  if (truncated_tokens == 0) return "";
  return absl::StrCat("warning: the prompt exceeds the model's token limit; its last ",
                      truncated_tokens, " tokens were dropped\n");
}

std::string FormatTable(const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> widths;
  for (const std::vector<std::string>& row : rows) {
    if (widths.size() < row.size()) widths.resize(row.size(), 0);
    for (size_t c = 0; c < row.size(); ++c) widths[c] = std::max(widths[c], row[c].size());
  }
  std::string text;
  for (const std::vector<std::string>& row : rows) {
    std::string line;
    for (size_t c = 0; c < row.size(); ++c) {
      line += row[c];
      if (c + 1 < row.size()) line += std::string(widths[c] - row[c].size() + 2, ' ');
    }
    text += line + "\n";
  }
  return text;
}

std::string DumpJson(const nlohmann::ordered_json& json) {
  return json.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
}

}  // namespace dmdserve::client
