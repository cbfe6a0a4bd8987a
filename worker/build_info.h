// Build information of worker/'s dependencies, for logs and dmdserve_build_info, so that callers
// outside worker/ need no libtorch headers.
#ifndef DMDSERVE_WORKER_BUILD_INFO_H_
#define DMDSERVE_WORKER_BUILD_INFO_H_

#include <string>

namespace dmdserve {

// The version of the libtorch headers dmdserve was compiled against (TORCH_VERSION, e.g.
// "2.1.2"). Thread-safe; no libtorch initialisation.
std::string LibtorchVersion();

}  // namespace dmdserve

#endif  // DMDSERVE_WORKER_BUILD_INFO_H_
