#include "server/tls.h"

#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <memory>
#include <string>

#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace dmdserve {
namespace {

struct BioFree {
  void operator()(BIO* bio) const { BIO_free(bio); }
};
struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
struct KeyFree {
  void operator()(EVP_PKEY* key) const { EVP_PKEY_free(key); }
};
using Bio = std::unique_ptr<BIO, BioFree>;
using Certificate = std::unique_ptr<X509, X509Free>;
using PrivateKey = std::unique_ptr<EVP_PKEY, KeyFree>;

absl::Status Bad(const char* flag, const std::string& file, const std::string& problem) {
  return absl::InvalidArgumentError(absl::StrCat(flag, "=", file, ": ", problem));
}

// The file opened for OpenSSL's PEM readers; nullptr when it cannot be opened.
Bio ReadFile(const std::string& path) { return Bio(BIO_new_file(path.c_str(), "r")); }

// The first certificate of a PEM file (the server's own, in a chain).
absl::StatusOr<Certificate> ReadCertificate(const char* flag, const std::string& path) {
  Bio bio = ReadFile(path);
  if (bio == nullptr) return Bad(flag, path, "cannot read the file");
  Certificate certificate(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  if (certificate == nullptr) return Bad(flag, path, "no PEM certificate in the file");
  return certificate;
}

absl::Status CheckKeyMatches(const TlsOptions& options, X509* certificate) {
  Bio bio = ReadFile(options.key_file);
  if (bio == nullptr) return Bad("--tls_key_file", options.key_file, "cannot read the file");
  PrivateKey key(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
  if (key == nullptr) {
    return Bad("--tls_key_file", options.key_file,
               "no unencrypted PEM private key in the file");
  }
  if (X509_check_private_key(certificate, key.get()) != 1) {
    return Bad("--tls_key_file", options.key_file,
               absl::StrCat("the key does not belong to the certificate of --tls_cert_file=",
                            options.cert_file));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateTls(const TlsOptions& options) {
  if (options.refresh_s < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tls_refresh_s must be >= 1, got ", options.refresh_s));
  }
  if (options.cert_file.empty() != options.key_file.empty()) {
    return absl::InvalidArgumentError("--tls_cert_file and --tls_key_file go together: set both");
  }
  if (!options.enabled()) {
    if (options.client_ca_file.empty()) return absl::OkStatus();
    return absl::InvalidArgumentError(
        "--tls_client_ca_file needs TLS: set --tls_cert_file and --tls_key_file too");
  }
  absl::StatusOr<Certificate> certificate = ReadCertificate("--tls_cert_file", options.cert_file);
  if (!certificate.ok()) return certificate.status();
  if (absl::Status s = CheckKeyMatches(options, certificate->get()); !s.ok()) return s;
  if (!options.client_ca_file.empty()) {
    absl::StatusOr<Certificate> ca = ReadCertificate("--tls_client_ca_file",
                                                     options.client_ca_file);
    if (!ca.ok()) return ca.status();
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsOptions& options) {
  if (absl::Status s = ValidateTls(options); !s.ok()) return s;
  if (!options.enabled()) return grpc::InsecureServerCredentials();
  auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      options.key_file, options.cert_file, options.client_ca_file,
      static_cast<unsigned int>(options.refresh_s));
  grpc::experimental::TlsServerCredentialsOptions tls(provider);
  tls.watch_identity_key_cert_pairs();
  if (!options.client_ca_file.empty()) {
    tls.watch_root_certs();
    tls.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  }
  return grpc::experimental::TlsServerCredentials(tls);
}

bool IsLoopbackHost(const std::string& host) {
  return host == "localhost" || host == "::1" || host == "[::1]" ||
         absl::StartsWith(host, "127.");
}

}  // namespace dmdserve
