#include "server/https_credentials.h"

#include <sys/stat.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"

namespace dmdserve {
namespace {

// The one HttpsCredentials of the process (GnuTLS's callback has no user pointer).
std::atomic<HttpsCredentials*> current{nullptr};

// Most certificates a chain file may hold.
constexpr unsigned int kMaxChain = 16;

absl::Status Bad(const char* flag, const std::string& file, const std::string& problem) {
  return absl::InvalidArgumentError(absl::StrCat(flag, "=", file, ": ", problem));
}

absl::StatusOr<std::string> ReadFile(const char* flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  if (!in || !(text << in.rdbuf())) return Bad(flag, path, "cannot read the file");
  return text.str();
}

gnutls_datum_t Datum(const std::string& bytes) {
  return {reinterpret_cast<unsigned char*>(const_cast<char*>(bytes.data())),
          static_cast<unsigned int>(bytes.size())};
}

}  // namespace

// What tells that a file was replaced or rewritten: its inode (a rename over it, as
// cert-manager and Kubernetes secret volumes do), size and modification time. All zero when it
// cannot be read (then a reload is tried, and fails with a clear log line).
struct HttpsCredentials::FileStamp {
  ino_t inode = 0;
  off_t size = 0;
  int64_t modified_ns = 0;
  bool operator==(const FileStamp& o) const {
    return inode == o.inode && size == o.size && modified_ns == o.modified_ns;
  }
};

namespace {

HttpsCredentials::FileStamp StampOf(const std::string& path) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) return {};
  return {st.st_ino, st.st_size, int64_t{st.st_mtim.tv_sec} * 1'000'000'000 + st.st_mtim.tv_nsec};
}

// The stamps of every file of `o`: cert, key[, client CA].
std::vector<HttpsCredentials::FileStamp> StampsOf(const TlsOptions& o) {
  std::vector<HttpsCredentials::FileStamp> stamps = {StampOf(o.cert_file), StampOf(o.key_file)};
  if (!o.client_ca_file.empty()) stamps.push_back(StampOf(o.client_ca_file));
  return stamps;
}

// True when the public key of `cert` is the one of `key`.
bool KeyMatches(gnutls_pcert_st& cert, gnutls_privkey_t key) {
  gnutls_pubkey_t from_key = nullptr;
  gnutls_datum_t a{}, b{};
  bool same = gnutls_pubkey_init(&from_key) == 0 &&
              gnutls_pubkey_import_privkey(from_key, key, 0, 0) == 0 &&
              gnutls_pubkey_export2(from_key, GNUTLS_X509_FMT_DER, &a) == 0 &&
              gnutls_pubkey_export2(cert.pubkey, GNUTLS_X509_FMT_DER, &b) == 0 &&
              a.size == b.size && std::memcmp(a.data, b.data, a.size) == 0;
  gnutls_free(a.data);
  gnutls_free(b.data);
  if (from_key != nullptr) gnutls_pubkey_deinit(from_key);
  return same;
}

}  // namespace

struct HttpsCredentials::Generation {
  std::vector<gnutls_pcert_st> chain;
  gnutls_privkey_t key = nullptr;
  gnutls_x509_trust_list_t client_ca = nullptr;  // null without mTLS
  std::vector<FileStamp> stamps;                 // of the files as loaded: cert, key[, client CA]

  Generation() = default;
  Generation(const Generation&) = delete;
  Generation& operator=(const Generation&) = delete;
  ~Generation() {
    for (gnutls_pcert_st& cert : chain) gnutls_pcert_deinit(&cert);
    if (key != nullptr) gnutls_privkey_deinit(key);
    if (client_ca != nullptr) gnutls_x509_trust_list_deinit(client_ca, 1);
  }
};

namespace {

absl::Status LoadChainAndKey(const TlsOptions& o, HttpsCredentials::Generation& g) {
  absl::StatusOr<std::string> cert = ReadFile("--tls_cert_file", o.cert_file);
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key = ReadFile("--tls_key_file", o.key_file);
  if (!key.ok()) return key.status();
  std::vector<gnutls_pcert_st> chain(kMaxChain);
  unsigned int count = kMaxChain;
  const gnutls_datum_t cert_data = Datum(*cert);
  if (const int e = gnutls_pcert_list_import_x509_raw(chain.data(), &count, &cert_data,
                                                      GNUTLS_X509_FMT_PEM, 0);
      e < 0 || count == 0) {
    return Bad("--tls_cert_file", o.cert_file,
               absl::StrCat("no PEM certificate chain (of at most ", kMaxChain,
                            ") in the file: ", e < 0 ? gnutls_strerror(e) : "empty"));
  }
  chain.resize(count);
  g.chain = std::move(chain);
  const gnutls_datum_t key_data = Datum(*key);
  if (gnutls_privkey_init(&g.key) < 0 ||
      gnutls_privkey_import_x509_raw(g.key, &key_data, GNUTLS_X509_FMT_PEM, nullptr, 0) < 0) {
    return Bad("--tls_key_file", o.key_file, "no unencrypted PEM private key in the file");
  }
  if (!KeyMatches(g.chain.front(), g.key)) {
    return Bad("--tls_key_file", o.key_file,
               absl::StrCat("the key does not belong to the certificate of --tls_cert_file=",
                            o.cert_file));
  }
  return absl::OkStatus();
}

absl::Status LoadClientCa(const TlsOptions& o, const std::string& pem,
                          HttpsCredentials::Generation& g) {
  const gnutls_datum_t data = Datum(pem);
  if (gnutls_x509_trust_list_init(&g.client_ca, 0) < 0 ||
      gnutls_x509_trust_list_add_trust_mem(g.client_ca, &data, nullptr, GNUTLS_X509_FMT_PEM, 0,
                                           0) <= 0) {
    return Bad("--tls_client_ca_file", o.client_ca_file, "no PEM CA certificate in the file");
  }
  return absl::OkStatus();
}

// Every file of `o` loaded into a new generation; `client_ca_pem` receives the client CA's text.
absl::StatusOr<std::unique_ptr<HttpsCredentials::Generation>> Load(const TlsOptions& o,
                                                                   std::string* client_ca_pem) {
  auto g = std::make_unique<HttpsCredentials::Generation>();
  g->stamps = StampsOf(o);
  if (absl::Status s = LoadChainAndKey(o, *g); !s.ok()) return s;
  if (!o.client_ca_file.empty()) {
    absl::StatusOr<std::string> pem = ReadFile("--tls_client_ca_file", o.client_ca_file);
    if (!pem.ok()) return pem.status();
    if (absl::Status s = LoadClientCa(o, *pem, *g); !s.ok()) return s;
    if (client_ca_pem != nullptr) *client_ca_pem = *std::move(pem);
  }
  return g;
}

}  // namespace

HttpsCredentials::HttpsCredentials(TlsOptions options, Clock* clock)
    : options_(std::move(options)), clock_(clock != nullptr ? clock : RealClock::Get()) {}

absl::StatusOr<std::unique_ptr<HttpsCredentials>> HttpsCredentials::Create(
    const TlsOptions& options, Clock* clock) {
  if (!options.enabled()) return absl::InvalidArgumentError("HTTPS needs --tls_cert_file");
  auto credentials = std::unique_ptr<HttpsCredentials>(new HttpsCredentials(options, clock));
  absl::StatusOr<std::unique_ptr<Generation>> first = Load(options, &credentials->client_ca_pem_);
  if (!first.ok()) return first.status();
  HttpsCredentials* expected = nullptr;
  if (!current.compare_exchange_strong(expected, credentials.get())) {
    return absl::FailedPreconditionError("only one HTTPS server may run in a process");
  }
  absl::MutexLock lock(&credentials->mu_);
  credentials->generations_.push_back(*std::move(first));
  credentials->last_check_ = credentials->clock_->Now();
  return credentials;
}

HttpsCredentials::~HttpsCredentials() {
  HttpsCredentials* self = this;
  current.compare_exchange_strong(self, nullptr);
}

void HttpsCredentials::MaybeReload() {
  const absl::Time now = clock_->Now();
  if (now - last_check_ < absl::Seconds(options_.refresh_s)) return;
  last_check_ = now;
  std::vector<FileStamp> stamps = StampsOf(options_);
  if (stamps == generations_.back()->stamps) return;
  absl::StatusOr<std::unique_ptr<Generation>> next = Load(options_, nullptr);
  if (!next.ok()) {
    spdlog::warn("HTTPS: certificate files changed but do not load; keeping the previous ones: {}",
                 std::string(next.status().message()));
    generations_.back()->stamps = std::move(stamps);  // not retried until they change again
    return;
  }
  generations_.push_back(*std::move(next));
  spdlog::info("HTTPS: certificate files reloaded");
}

int HttpsCredentials::RetrieveCertificate(gnutls_session_t, const gnutls_datum_t*, int,
                                          const gnutls_pk_algorithm_t*, int,
                                          gnutls_pcert_st** pcert, unsigned int* pcert_length,
                                          gnutls_privkey_t* privkey) {
  HttpsCredentials* self = current.load();
  if (self == nullptr) return -1;  // fails the handshake
  absl::MutexLock lock(&self->mu_);
  self->MaybeReload();
  Generation& g = *self->generations_.back();
  *pcert = g.chain.data();
  *pcert_length = static_cast<unsigned int>(g.chain.size());
  *privkey = g.key;
  return 0;
}

absl::Status HttpsCredentials::VerifyClient(gnutls_session_t session) {
  if (!requires_client_certificate()) return absl::OkStatus();
  unsigned int count = 0;
  const gnutls_datum_t* peers =
      session == nullptr ? nullptr : gnutls_certificate_get_peers(session, &count);
  if (peers == nullptr || count == 0) {
    return absl::UnauthenticatedError(
        "a client certificate is required: present one signed by the server's client CA");
  }
  std::vector<gnutls_x509_crt_t> chain;
  for (unsigned int i = 0; i < count; ++i) {
    gnutls_x509_crt_t cert = nullptr;
    if (gnutls_x509_crt_init(&cert) < 0) break;
    chain.push_back(cert);
    if (gnutls_x509_crt_import(cert, &peers[i], GNUTLS_X509_FMT_DER) < 0) break;
  }
  unsigned int verdict = GNUTLS_CERT_INVALID;
  int result = -1;
  if (chain.size() == count) {
    gnutls_typed_vdata_st purpose{
        GNUTLS_DT_KEY_PURPOSE_OID,
        reinterpret_cast<unsigned char*>(const_cast<char*>(GNUTLS_KP_TLS_WWW_CLIENT)), 0};
    absl::MutexLock lock(&mu_);
    MaybeReload();
    result = gnutls_x509_trust_list_verify_crt2(generations_.back()->client_ca, chain.data(), count,
                                                &purpose, 1, 0, &verdict, nullptr);
  }
  for (gnutls_x509_crt_t cert : chain) gnutls_x509_crt_deinit(cert);
  if (result < 0 || verdict != 0) {
    return absl::UnauthenticatedError(
        "the client certificate is not valid for the server's client CA (unknown issuer, "
        "expired, or not for client authentication)");
  }
  return absl::OkStatus();
}

}  // namespace dmdserve
