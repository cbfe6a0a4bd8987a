// The RPC commands of dmdctl (generate, models, tokenize, health; bench is in bench.h).
//
// Each Run* function performs one command against `client`, prints its result on `out` and
// diagnostics on `err`, and returns the process exit code: 0 on success, 1 on failure (after
// printing "error: <CODE>: <message>" on `err`). Thread-compatible; they hold no state.
#ifndef DMDSERVE_CLIENT_COMMANDS_H_
#define DMDSERVE_CLIENT_COMMANDS_H_

#include <ostream>
#include <string>

#include "absl/status/status.h"
#include "client/dmd_client.h"
#include "dmdserve/v1/dmdserve.pb.h"

namespace dmdserve::client {

struct GenerateOptions {
  // Sent as is (model, prompt, num_images, seed, size, encoding, request_id).
  v1::GenerateRequest request;
  // Directory the images are written to; created when missing. Default ".".
  std::string out_dir = ".";
  // File name prefix of the images: <prefix>-<index>-seed<seed>.<png|raw>. Default "image".
  std::string prefix = "image";
  // Use GenerateStream and write each image as it arrives. Default false: unary Generate.
  bool stream = false;
  // Print one JSON object (output.h GenerateJson) instead of text. Default false.
  bool json = false;
};

struct ModelsOptions {
  bool json = false;  // print ModelsJson instead of a table
};

struct TokenizeOptions {
  v1::TokenizeRequest request;
  bool json = false;  // print exactly TokenizeJson and nothing else on `out`
};

struct HealthOptions {
  std::string service;  // grpc.health.v1 service name; "" = the whole server
};

int RunGenerate(const DmdClient& client, const GenerateOptions& options, std::ostream& out,
                std::ostream& err);
int RunModels(const DmdClient& client, const ModelsOptions& options, std::ostream& out,
              std::ostream& err);
int RunTokenize(const DmdClient& client, const TokenizeOptions& options, std::ostream& out,
                std::ostream& err);
// Prints the serving status (SERVING, NOT_SERVING, ...); exit code 0 only for SERVING.
int RunHealth(const DmdClient& client, const HealthOptions& options, std::ostream& out,
              std::ostream& err);

// Prints "error: <CODE>: <message>" on `err` and returns 1.
int ReportError(const absl::Status& status, std::ostream& err);

}  // namespace dmdserve::client

#endif  // DMDSERVE_CLIENT_COMMANDS_H_
