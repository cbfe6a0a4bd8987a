// HttpsCredentials: TLS for the HTTP API (libmicrohttpd over GnuTLS) from the same files as the
// gRPC port (tls.h): the server certificate chain and key, and with a client CA, client
// certificates checked against it (mTLS). Like the gRPC port's file watcher, the files are
// re-read while serving: a handshake at least refresh_s after the last check looks at the files
// and, when they changed and the new files load, uses them from then on (open
// connections keep theirs). A file counts as changed when its inode, size or modification time
// did. Files that fail to load while serving are logged and the previous
// ones kept.
//
// Wiring: the HTTP server gives libmicrohttpd MHD_OPTION_HTTPS_CERT_CALLBACK =
// HttpsCredentials::RetrieveCertificate and, for mTLS, MHD_OPTION_HTTPS_MEM_TRUST =
// client_ca_pem() (which makes GnuTLS ask clients for a certificate), then calls VerifyClient on
// each request's TLS session: GnuTLS only requests the certificate, it does not require one.
//
// GnuTLS's certificate callback carries no user pointer, so at most one HttpsCredentials exists
// at a time in a process (Create refuses a second); the callback finds it through a global.
// Thread-safe. Certificates handed to GnuTLS stay alive until the object is destroyed (a renewal
// keeps the old ones: a handshake may still be using them), so destroy it only after the
// daemon.
#ifndef DMDSERVE_SERVER_HTTPS_CREDENTIALS_H_
#define DMDSERVE_SERVER_HTTPS_CREDENTIALS_H_

#include <gnutls/abstract.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include <ctime>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/tls.h"
#include "worker/clock.h"

namespace dmdserve {

class HttpsCredentials {
 public:
  // Loads the files of `options` (which must be enabled()); INVALID_ARGUMENT naming the flag and
  // the file when one does not load, FAILED_PRECONDITION when another HttpsCredentials exists.
  // `clock` (not owned, must outlive it; nullptr: real time) times refresh_s.
  static absl::StatusOr<std::unique_ptr<HttpsCredentials>> Create(const TlsOptions& options,
                                                                  Clock* clock = nullptr);
  ~HttpsCredentials();

  HttpsCredentials(const HttpsCredentials&) = delete;
  HttpsCredentials& operator=(const HttpsCredentials&) = delete;

  // The client CA bundle as read at start-up (PEM); empty without mTLS. Its CA names are what
  // GnuTLS sends clients when it asks for a certificate; VerifyClient uses the current file.
  const std::string& client_ca_pem() const { return client_ca_pem_; }
  bool requires_client_certificate() const { return !options_.client_ca_file.empty(); }

  // OK when mTLS is off, or when `session`'s client presented a certificate chain that the
  // current client CA bundle verifies; UNAUTHENTICATED saying why otherwise.
  absl::Status VerifyClient(gnutls_session_t session);

  // gnutls_certificate_retrieve_function2 for MHD_OPTION_HTTPS_CERT_CALLBACK: the current
  // certificate chain and key, re-reading the files first when refresh_s has passed.
  static int RetrieveCertificate(gnutls_session_t session, const gnutls_datum_t* req_ca_rdn,
                                 int nreqs, const gnutls_pk_algorithm_t* pk_algos,
                                 int pk_algos_length, gnutls_pcert_st** pcert,
                                 unsigned int* pcert_length, gnutls_privkey_t* privkey);

  // Internal (https_credentials.cc): one loaded generation of the files, and what identifies a
  // version of a file.
  struct Generation;
  struct FileStamp;

 private:
  HttpsCredentials(TlsOptions options, Clock* clock);

  // Re-reads the files when refresh_s has passed since the last check and they changed.
  void MaybeReload() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const TlsOptions options_;
  Clock* const clock_;
  std::string client_ca_pem_;
  absl::Mutex mu_;
  // Every generation loaded; the last is current. Older ones stay for handshakes in progress.
  std::vector<std::unique_ptr<Generation>> generations_ ABSL_GUARDED_BY(mu_);
  absl::Time last_check_ ABSL_GUARDED_BY(mu_);
};

}  // namespace dmdserve

#endif  // DMDSERVE_SERVER_HTTPS_CREDENTIALS_H_
