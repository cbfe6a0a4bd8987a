// HttpsCredentials on certificates made by the openssl command: start-up errors name the flag and
// the file, one instance per process, the handshake callback serves the chain and key, renewed
// files are picked up after refresh_s, and files that stop loading keep the previous ones.
#include "server/https_credentials.h"

#include <cstdlib>
#include <filesystem>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/clock.h"
#include "worker/test_util.h"

namespace dmdserve {
namespace {

using ::testing::HasSubstr;

class HttpsCredentialsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(::dmdserve::testing::MakeTempDir());
    for (const char* name : {"a", "b"}) {
      const std::string cmd = absl::StrCat(
          "cd ", *dir_, " && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 ",
          "-nodes -days 1 -subj /CN=", name, " -keyout ", name, ".key -out ", name,
          ".pem 2>/dev/null");
      ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
    }
  }

  static std::string Path(const std::string& name) { return *dir_ + "/" + name; }

  static TlsOptions Options(const std::string& cert, const std::string& key) {
    TlsOptions options;
    options.cert_file = Path(cert);
    options.key_file = Path(key);
    return options;
  }

  // The DER of the first certificate the handshake callback serves.
  static std::string Served() {
    gnutls_pcert_st* chain = nullptr;
    unsigned int length = 0;
    gnutls_privkey_t key = nullptr;
    EXPECT_EQ(HttpsCredentials::RetrieveCertificate(nullptr, nullptr, 0, nullptr, 0, &chain,
                                                    &length, &key),
              0);
    if (chain == nullptr || length == 0 || key == nullptr) return "";
    return std::string(reinterpret_cast<const char*>(chain[0].cert.data), chain[0].cert.size);
  }

  static std::string* dir_;
};

std::string* HttpsCredentialsTest::dir_ = nullptr;

TEST_F(HttpsCredentialsTest, BadFilesNameTheFlagAndTheFile) {
  const struct {
    TlsOptions options;
    const char* flag;
  } cases[] = {
      {Options("missing.pem", "a.key"), "--tls_cert_file"},
      {Options("a.key", "a.key"), "--tls_cert_file"},
      {Options("a.pem", "a.pem"), "--tls_key_file"},
      {Options("a.pem", "b.key"), "--tls_key_file"},  // the key of another certificate
  };
  for (const auto& c : cases) {
    absl::StatusOr<std::unique_ptr<HttpsCredentials>> https = HttpsCredentials::Create(c.options);
    ASSERT_FALSE(https.ok()) << c.options.cert_file << " " << c.options.key_file;
    EXPECT_EQ(https.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(https.status().message()), HasSubstr(c.flag));
  }
  TlsOptions bad_ca = Options("a.pem", "a.key");
  bad_ca.client_ca_file = Path("a.key");
  EXPECT_THAT(std::string(HttpsCredentials::Create(bad_ca).status().message()),
              HasSubstr("--tls_client_ca_file"));
}

TEST_F(HttpsCredentialsTest, OnePerProcessAndNoCertificateWithoutOne) {
  gnutls_pcert_st* chain = nullptr;
  unsigned int length = 0;
  gnutls_privkey_t key = nullptr;
  EXPECT_NE(
      HttpsCredentials::RetrieveCertificate(nullptr, nullptr, 0, nullptr, 0, &chain, &length, &key),
      0);
  auto first = HttpsCredentials::Create(Options("a.pem", "a.key"));
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(HttpsCredentials::Create(Options("a.pem", "a.key")).status().code(),
            absl::StatusCode::kFailedPrecondition);
  first->reset();
  EXPECT_TRUE(HttpsCredentials::Create(Options("a.pem", "a.key")).ok());
}

TEST_F(HttpsCredentialsTest, RenewedFilesAreServedAfterTheRefreshAndBrokenOnesAreNot) {
  const std::string live = ::dmdserve::testing::MakeTempDir();
  auto install = [&](const std::string& cert, const std::string& key) {
    std::filesystem::copy_file(Path(cert), live + "/tmp.pem");
    std::filesystem::copy_file(Path(key), live + "/tmp.key");
    std::filesystem::rename(live + "/tmp.key", live + "/server.key");
    std::filesystem::rename(live + "/tmp.pem", live + "/server.pem");
  };
  install("a.pem", "a.key");
  TlsOptions options;
  options.cert_file = live + "/server.pem";
  options.key_file = live + "/server.key";
  options.refresh_s = 1;
  FakeClock clock;
  auto https = HttpsCredentials::Create(options, &clock);
  ASSERT_TRUE(https.ok()) << https.status();
  const std::string a = Served();
  ASSERT_FALSE(a.empty());

  install("b.pem", "b.key");
  clock.Advance(absl::Milliseconds(900));
  EXPECT_EQ(Served(), a);  // within refresh_s of the last check: not looked at
  clock.Advance(absl::Milliseconds(200));
  const std::string b = Served();
  EXPECT_NE(b, a);

  install("a.pem", "b.key");  // a mismatched pair: kept out, b still served
  clock.Advance(absl::Seconds(2));
  EXPECT_EQ(Served(), b);
}

TEST_F(HttpsCredentialsTest, ClientCertificateRequiredOnlyWithAClientCa) {
  auto plain = HttpsCredentials::Create(Options("a.pem", "a.key"));
  ASSERT_TRUE(plain.ok());
  EXPECT_FALSE((*plain)->requires_client_certificate());
  EXPECT_TRUE((*plain)->VerifyClient(nullptr).ok());
  plain->reset();

  TlsOptions mutual = Options("a.pem", "a.key");
  mutual.client_ca_file = Path("b.pem");
  auto https = HttpsCredentials::Create(mutual);
  ASSERT_TRUE(https.ok()) << https.status();
  EXPECT_TRUE((*https)->requires_client_certificate());
  EXPECT_THAT((*https)->client_ca_pem(), HasSubstr("BEGIN CERTIFICATE"));
  const absl::Status no_session = (*https)->VerifyClient(nullptr);
  EXPECT_EQ(no_session.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(std::string(no_session.message()), HasSubstr("client certificate is required"));
}

}  // namespace
}  // namespace dmdserve
