// TLS for the gRPC listener: server certificates, optional client-certificate verification
// (mTLS), and certificates re-read while serving.
//
// With TlsOptions.cert_file and key_file set, the listener speaks TLS only. The files are checked
// once at start-up with OpenSSL (each PEM parses, the key belongs to the certificate, the client
// CA bundle holds at least one certificate), so a wrong file is a clear start-up error rather
// than failed handshakes. While serving, gRPC's file watcher re-reads the three files every
// refresh_s seconds: a renewed certificate (e.g. by cert-manager) is used for new connections
// without a restart, and open connections are not dropped. With client_ca_file set, a client
// must present a certificate signed by that CA, or its handshake fails.
//
// Pure functions; thread-safe.
#ifndef DMDSERVE_SERVER_TLS_H_
#define DMDSERVE_SERVER_TLS_H_

#include <memory>
#include <string>

#include <grpcpp/security/server_credentials.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace dmdserve {

struct TlsOptions {
  // PEM certificate chain the server presents. Empty (default): no TLS (plaintext).
  std::string cert_file;
  // PEM private key of cert_file. Required with cert_file.
  std::string key_file;
  // PEM bundle of the CA(s) that sign client certificates. Set: mTLS, clients must present a
  // certificate it signed. Needs cert_file. Default empty.
  std::string client_ca_file;
  // How often the files are checked for changes while serving, in seconds, >= 1. Default 60.
  int refresh_s = 60;

  bool enabled() const { return !cert_file.empty(); }
};

// The checks described above. INVALID_ARGUMENT naming the option (as its flag, e.g.
// --tls_key_file) and the file: one of cert/key without the other, a client CA without a
// certificate, refresh_s < 1, an unreadable file, a PEM that does not parse, a key that does not
// match the certificate. OK for a disabled TlsOptions without client_ca_file.
absl::Status ValidateTls(const TlsOptions& options);

// ValidateTls, then the listener's credentials: insecure when TLS is disabled, else TLS with the
// file watcher (and client-certificate verification with client_ca_file).
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsOptions& options);

// True for a host that only the local machine can reach: "localhost", 127.0.0.0/8, "::1".
bool IsLoopbackHost(const std::string& host);

}  // namespace dmdserve

#endif  // DMDSERVE_SERVER_TLS_H_
