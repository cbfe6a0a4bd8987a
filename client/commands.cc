#include "client/commands.h"

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <system_error>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/output.h"

namespace dmdserve::client {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

std::string ImagePath(const GenerateOptions& options, const v1::GeneratedImage& image) {
  return (std::filesystem::path(options.out_dir) /
          ImageFileName(options.prefix, image.index(), image.seed(), image.encoding()))
      .string();
}

absl::Status WriteFile(const std::string& path, const std::string& data) {
  std::FILE* file = std::fopen(path.c_str(), "wb");
  if (file == nullptr) return absl::ErrnoToStatus(errno, absl::StrCat("cannot create ", path));
  const bool written = std::fwrite(data.data(), 1, data.size(), file) == data.size();
  const int write_errno = errno;
  if (std::fclose(file) != 0 || !written) {
    return absl::ErrnoToStatus(written ? errno : write_errno, absl::StrCat("cannot write ", path));
  }
  return absl::OkStatus();
}

// Runs the unary or streaming call, writing every image; fills `paths` in index order.
absl::StatusOr<v1::GenerateResponse> GenerateAndWrite(const DmdClient& client,
                                                      const GenerateOptions& options,
                                                      std::vector<std::string>* paths,
                                                      std::ostream& err) {
  v1::GenerateResponse response;
  if (options.stream) {
    const Clock::time_point start = Clock::now();
    std::vector<v1::GeneratedImage> images;
    absl::Status status =
        client.GenerateStream(options.request, [&](const v1::GeneratedImage& image) {
          const std::string path = ImagePath(options, image);
          absl::Status written = WriteFile(path, image.data());
          if (!written.ok()) return written;
          err << absl::StreamFormat("received image %d (seed %d) after %.3f s: %s\n", image.index(),
                                    image.seed(), SecondsSince(start), path);
          images.push_back(image);
          images.back().clear_data();
          return absl::OkStatus();
        });
    if (!status.ok()) return status;
    response = AssembleStreamResponse(std::move(images));
  } else {
    absl::StatusOr<v1::GenerateResponse> unary = client.Generate(options.request);
    if (!unary.ok()) return unary.status();
    response = *std::move(unary);
    for (const v1::GeneratedImage& image : response.images()) {
      absl::Status written = WriteFile(ImagePath(options, image), image.data());
      if (!written.ok()) return written;
    }
  }
  for (const v1::GeneratedImage& image : response.images()) {
    paths->push_back(ImagePath(options, image));
  }
  return response;
}

}  // namespace

int ReportError(const absl::Status& status, std::ostream& err) {
  err << "error: " << absl::StatusCodeToString(status.code()) << ": " << status.message() << "\n";
  return 1;
}

int RunGenerate(const DmdClient& client, const GenerateOptions& options, std::ostream& out,
                std::ostream& err) {
  std::error_code error;
  std::filesystem::create_directories(options.out_dir, error);
  if (error) {
    return ReportError(absl::ErrnoToStatus(error.value(), absl::StrCat("cannot create --out_dir ",
                                                                       options.out_dir)),
                       err);
  }
  const Clock::time_point start = Clock::now();
  std::vector<std::string> paths;
  absl::StatusOr<v1::GenerateResponse> response = GenerateAndWrite(client, options, &paths, err);
  if (!response.ok()) return ReportError(response.status(), err);
  const double client_seconds = SecondsSince(start);

  err << TruncationWarning(response->truncated_tokens());
  if (options.json) {
    out << DumpJson(GenerateJson(*response, paths, client_seconds)) << "\n";
  } else {
    out << GenerateText(*response, paths, client_seconds);
  }
  return 0;
}

int RunModels(const DmdClient& client, const ModelsOptions& options, std::ostream& out,
              std::ostream& err) {
  absl::StatusOr<v1::ListModelsResponse> response = client.ListModels();
  if (!response.ok()) return ReportError(response.status(), err);
  out << (options.json ? DumpJson(ModelsJson(*response)) + "\n" : ModelsTable(*response));
  return 0;
}

int RunTokenize(const DmdClient& client, const TokenizeOptions& options, std::ostream& out,
                std::ostream& err) {
  absl::StatusOr<v1::TokenizeResponse> response = client.Tokenize(options.request);
  if (!response.ok()) return ReportError(response.status(), err);
  err << TruncationWarning(response->truncated_tokens());
  out << (options.json ? DumpJson(TokenizeJson(*response)) + "\n" : TokenizeText(*response));
  return 0;
}

int RunHealth(const DmdClient& client, const HealthOptions& options, std::ostream& out,
              std::ostream& err) {
  using grpc::health::v1::HealthCheckResponse;
  absl::StatusOr<HealthCheckResponse::ServingStatus> status = client.CheckHealth(options.service);
  if (!status.ok()) return ReportError(status.status(), err);
  out << HealthCheckResponse::ServingStatus_Name(*status) << "\n";
  return *status == HealthCheckResponse::SERVING ? 0 : 1;
}

}  // namespace dmdserve::client
