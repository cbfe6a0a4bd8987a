#include "server/api_keys.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace dmdserve {
namespace {

constexpr double kBurstSeconds = 2.0;
constexpr size_t kMaxNameLength = 64;

bool ValidName(absl::string_view name) {
  if (name.empty() || name.size() > kMaxNameLength) return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-';
  });
}

bool ParseHash(absl::string_view hex, std::array<uint8_t, 32>* out) {
  if (hex.size() != 64) return false;
  for (size_t i = 0; i < 32; ++i) {
    int byte = 0;
    for (const char c : hex.substr(2 * i, 2)) {
      if (!absl::ascii_isxdigit(static_cast<unsigned char>(c))) return false;
      byte = byte * 16 + (absl::ascii_isdigit(static_cast<unsigned char>(c))
                              ? c - '0'
                              : absl::ascii_tolower(static_cast<unsigned char>(c)) - 'a' + 10);
    }
    (*out)[i] = static_cast<uint8_t>(byte);
  }
  return true;
}

std::array<uint8_t, 32> Sha256(absl::string_view data) {
  std::array<uint8_t, 32> digest{};
  unsigned int size = 0;
  EVP_Digest(data.data(), data.size(), digest.data(), &size, EVP_sha256(), nullptr);
  return digest;
}

// One line's key; INVALID_ARGUMENT (without the file and line, added by Parse) otherwise.
absl::StatusOr<ApiKeys::Key> ParseLine(absl::string_view line) {
  const std::vector<absl::string_view> fields =
      absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
  if (fields.size() < 2 || fields.size() > 3) {
    return absl::InvalidArgumentError(
        absl::StrCat("expected NAME SHA256HEX [IMAGES_PER_SECOND], got ", fields.size(),
                     " field(s)"));
  }
  ApiKeys::Key key;
  key.name = std::string(fields[0]);
  if (!ValidName(key.name)) {
    return absl::InvalidArgumentError(
        absl::StrCat("name '", key.name, "' must be 1-64 characters of [A-Za-z0-9._-]"));
  }
  if (!ParseHash(fields[1], &key.sha256)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "key '", key.name, "': the hash must be 64 hex digits (sha256sum of the secret)"));
  }
  if (fields.size() == 3 && (!absl::SimpleAtod(fields[2], &key.images_per_second) ||
                             !std::isfinite(key.images_per_second) ||
                             key.images_per_second <= 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "key '", key.name, "': IMAGES_PER_SECOND must be a number > 0, got '", fields[2], "'"));
  }
  return key;
}

}  // namespace

absl::StatusOr<std::vector<ApiKeys::Key>> ApiKeys::Parse(absl::string_view text,
                                                         const std::string& path) {
  std::vector<Key> keys;
  int number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++number;
    line = absl::StripAsciiWhitespace(line.substr(0, line.find('#')));
    if (line.empty()) continue;
    absl::StatusOr<Key> key = ParseLine(line);
    if (key.ok()) {
      for (const Key& other : keys) {
        if (other.name == key->name || other.sha256 == key->sha256) {
          key = absl::InvalidArgumentError(absl::StrCat(
              "key '", key->name, "' repeats the name or hash of key '", other.name, "'"));
          break;
        }
      }
    }
    if (!key.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ":", number, ": ", key.status().message()));
    }
    keys.push_back(*std::move(key));
  }
  return keys;
}

absl::StatusOr<std::unique_ptr<ApiKeys>> ApiKeys::Load(const std::string& path, Clock* clock) {
  std::unique_ptr<ApiKeys> keys(new ApiKeys(path, clock != nullptr ? clock : RealClock::Get()));
  absl::StatusOr<int> loaded = keys->Reload();
  if (!loaded.ok()) return loaded.status();
  return keys;
}

absl::StatusOr<int> ApiKeys::Reload() {
  std::ifstream in(path_, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat(path_, ": cannot read the keys file"));
  std::stringstream text;
  text << in.rdbuf();
  absl::StatusOr<std::vector<Key>> keys = Parse(text.str(), path_);
  if (!keys.ok()) return keys.status();
  absl::MutexLock lock(&mu_);
  keys_ = *std::move(keys);
  std::map<std::string, Bucket> buckets;
  for (const Key& key : keys_) {
    const auto old = buckets_.find(key.name);
    Bucket bucket = old != buckets_.end()
                        ? old->second
                        : Bucket{0, key.images_per_second * kBurstSeconds, clock_->Now()};
    bucket.images_per_second = key.images_per_second;
    buckets.emplace(key.name, bucket);
  }
  buckets_ = std::move(buckets);
  return static_cast<int>(keys_.size());
}

absl::StatusOr<std::string> ApiKeys::Authenticate(absl::string_view authorization) const {
  constexpr absl::string_view kScheme = "Bearer ";
  if (authorization.empty()) {
    return absl::UnauthenticatedError(
        "missing API key: send the metadata 'authorization: Bearer <key>'");
  }
  if (!absl::StartsWithIgnoreCase(authorization, kScheme)) {
    return absl::UnauthenticatedError("the authorization metadata must be 'Bearer <key>'");
  }
  const std::array<uint8_t, 32> digest =
      Sha256(absl::StripAsciiWhitespace(authorization.substr(kScheme.size())));
  absl::MutexLock lock(&mu_);
  const Key* found = nullptr;
  for (const Key& key : keys_) {  // every key compared, each in constant time
    if (CRYPTO_memcmp(key.sha256.data(), digest.data(), digest.size()) == 0) found = &key;
  }
  if (found == nullptr) return absl::UnauthenticatedError("unknown API key");
  return found->name;
}

absl::Status ApiKeys::Admit(const std::string& name, int images) {
  absl::MutexLock lock(&mu_);
  const auto it = buckets_.find(name);
  if (it == buckets_.end() || it->second.images_per_second <= 0) return absl::OkStatus();
  Bucket& bucket = it->second;
  const absl::Time now = clock_->Now();
  const double capacity = bucket.images_per_second * kBurstSeconds;
  bucket.tokens = std::min(capacity, bucket.tokens + absl::ToDoubleSeconds(now - bucket.updated) *
                                                         bucket.images_per_second);
  bucket.updated = now;
  if (images > capacity) {  // never admitted, however long the client waits: not a retry case
    return absl::InvalidArgumentError(absl::StrCat(
        "num_images is ", images, "; the limit for API key '", name, "' is ",
        std::floor(capacity), " (its burst: ", bucket.images_per_second,
        " images per second for ", kBurstSeconds, " s)"));
  }
  if (bucket.tokens < images) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "API key '", name, "' is limited to ", bucket.images_per_second,
        " images per second (bursts up to ", capacity, "); retry later"));
  }
  bucket.tokens -= images;
  return absl::OkStatus();
}

int ApiKeys::size() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(keys_.size());
}

}  // namespace dmdserve
