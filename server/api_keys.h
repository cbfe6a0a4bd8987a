// ApiKeys: API-key authentication and per-key rate limits for the gRPC API.
//
// The keys file (--api_keys_file) holds one key per line, `NAME SHA256HEX [IMAGES_PER_SECOND]`:
// the key's name (for logs and metrics: [A-Za-z0-9._-]{1,64}), the lowercase or uppercase hex
// SHA-256 of the secret (so the file holds no secret), and optionally a rate limit in images per
// second. Blank lines and `#` comments are ignored. Clients send `authorization: Bearer SECRET`;
// Authenticate() hashes the secret and compares it with every key's hash in constant time.
// A rate limit is a token bucket holding 2 s of images (burst), refilled continuously; a
// Generate that would overdraw it is refused whole with RESOURCE_EXHAUSTED naming the limit, and
// one asking for more images than the burst (which no wait would ever admit) with
// INVALID_ARGUMENT naming num_images and the most a request of that key may ask for.
//
// Reload() re-reads the file (SIGHUP in dmdserve): on an error the old keys stay. Buckets of
// keys that keep their name keep their level.
//
// Thread-safe: every method may be called from any thread.
#ifndef DMDSERVE_SERVER_API_KEYS_H_
#define DMDSERVE_SERVER_API_KEYS_H_

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "worker/clock.h"

namespace dmdserve {

// The key name requests are logged and counted under when they were refused before a key was
// known (unparseable, or no valid key), on every API of a server that has keys.
inline constexpr char kUnauthenticatedKey[] = "_unauthenticated";

class ApiKeys {
 public:
  struct Key {
    std::string name;
    std::array<uint8_t, 32> sha256{};
    double images_per_second = 0;  // 0: no limit
  };

  // The keys of a keys file's text; INVALID_ARGUMENT naming `path`, the line and the problem
  // (bad name, hash that is not 64 hex digits, bad rate, a duplicate name or hash).
  static absl::StatusOr<std::vector<Key>> Parse(absl::string_view text, const std::string& path);

  // Reads and parses `path`. `clock` (not owned; nullptr: real time) drives the rate limits.
  static absl::StatusOr<std::unique_ptr<ApiKeys>> Load(const std::string& path,
                                                       Clock* clock = nullptr);

  // Re-reads the file; on an error the keys in use stay. Returns the number of keys loaded.
  absl::StatusOr<int> Reload();

  // The name of the key that `authorization` ("Bearer SECRET") carries; UNAUTHENTICATED when it
  // is missing, malformed or matches no key (the message never echoes the secret).
  absl::StatusOr<std::string> Authenticate(absl::string_view authorization) const;

  // Takes `images` from key `name`'s bucket. RESOURCE_EXHAUSTED naming the key's limit when the
  // bucket holds fewer (nothing is taken); OK for keys without a limit.
  absl::Status Admit(const std::string& name, int images);

  int size() const;

 private:
  // A key's rate limit and its token bucket, by key name.
  struct Bucket {
    double images_per_second = 0;  // 0: no limit
    double tokens = 0;
    absl::Time updated;
  };
  ApiKeys(std::string path, Clock* clock) : path_(std::move(path)), clock_(clock) {}

  const std::string path_;
  Clock* const clock_;
  mutable absl::Mutex mu_;
  std::vector<Key> keys_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, Bucket> buckets_ ABSL_GUARDED_BY(mu_);
};

}  // namespace dmdserve

#endif  // DMDSERVE_SERVER_API_KEYS_H_
