# syntax=docker/dockerfile:1
# dmdserve images.
#   Default target (last stage): `cpu`, a slim CPU image on debian:bookworm-slim with Debian's
#   packages:            docker build -t dmdserve:cpu .
#   CUDA target (reviewed by reading; nvidia/cuda images cannot be pulled on our build machines):
#                        docker build --target cuda --build-arg CUDA_VERSION=12.6.3 \
#                          --build-arg LIBTORCH_URL=<libtorch cxx11-abi zip for that CUDA> \
#                          [--build-arg CUDA_ARCHITECTURES="80;90"] -t dmdserve:cuda .
#   Run it with --gpus all; DMDSERVE_DEVICES=cuda:0,cuda:1 spreads workers over GPUs (docs/GPU.md).
# Run:  docker run -p 50051:50051 -p 8080:8080 -p 9464:9464 dmdserve:cpu
#   (gRPC on 50051, the HTTP/JSON API and playground on 8080, Prometheus metrics on 9464)
# Other bundles: mount them and point DMDSERVE_MODEL_DIRS at them, e.g.
#   docker run -v /srv/bundles/sd15-dmd:/models/sd15-dmd:ro \
#     -e DMDSERVE_MODEL_DIRS=/models/sd15-dmd,/opt/dmdserve/models/fashion-dmd dmdserve:cpu
# Every dmdserve flag reads DMDSERVE_<FLAG> from the environment (dmdserve --help).

ARG DEBIAN_IMAGE=debian:bookworm-slim
ARG CUDA_VERSION=12.6.3

# ---------------------------------------------------------------------------------------------
# The sources both builds compile, listed once.
FROM scratch AS sources
COPY CMakeLists.txt /src/
COPY proto /src/proto
COPY worker /src/worker
COPY server /src/server
COPY client /src/client

# ---------------------------------------------------------------------------------------------
# CPU build: Debian's libtorch (CPU), gRPC, protobuf, absl, spdlog, prometheus-cpp, libpng,
# libmicrohttpd.
FROM ${DEBIAN_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update -q && apt-get install -y -q --no-install-recommends \
      build-essential cmake ninja-build pkg-config ca-certificates \
      libtorch-dev libgrpc++-dev protobuf-compiler-grpc protobuf-compiler libprotobuf-dev \
      libabsl-dev libspdlog-dev libfmt-dev prometheus-cpp-dev libpng-dev nlohmann-json3-dev \
      libutf8proc-dev libmicrohttpd-dev libopenblas0-openmp \
    && rm -rf /var/lib/apt/lists/*
COPY --from=sources /src /src
WORKDIR /src
RUN cmake -S . -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DDMDSERVE_BUILD_TESTS=OFF -DDMDSERVE_BUILD_BENCHMARKS=OFF -DDMDSERVE_BUILD_FUZZERS=OFF \
    && cmake --build /build --target dmdserve dmdctl \
    && mkdir -p /out/bin && cp /build/server/dmdserve /build/client/dmdctl /out/bin/ \
    && strip /out/bin/*
# The runtime stage installs exactly the packages that own the binaries' shared libraries.
COPY scripts/container/runtime_packages.sh /usr/local/bin/
RUN runtime_packages.sh /out/bin/dmdserve /out/bin/dmdctl > /out/runtime-packages.txt \
    && cat /out/runtime-packages.txt

# ---------------------------------------------------------------------------------------------
# CUDA build: a CUDA libtorch (cxx11 ABI) on the CUDA devel image. Ubuntu 24.04 packages the same
# gRPC 1.51 / protobuf 3.21 / absl 20220623 / prometheus-cpp 1.0.1 as Debian 12. Not built on our
# machines (no registry access to nvidia/cuda): keep it reviewed. See docs/PERFORMANCE.md for GPU.
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu24.04 AS build-cuda
ARG LIBTORCH_URL
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update -q && apt-get install -y -q --no-install-recommends \
      build-essential cmake ninja-build pkg-config ca-certificates curl unzip \
      libgrpc++-dev protobuf-compiler-grpc protobuf-compiler libprotobuf-dev libabsl-dev \
      libspdlog-dev libfmt-dev prometheus-cpp-dev libpng-dev nlohmann-json3-dev libutf8proc-dev \
      libmicrohttpd-dev \
    && rm -rf /var/lib/apt/lists/*
RUN test -n "${LIBTORCH_URL}" || { echo "set --build-arg LIBTORCH_URL" >&2; exit 1; } \
    && curl -fsSL -o /tmp/libtorch.zip "${LIBTORCH_URL}" && unzip -q /tmp/libtorch.zip -d /opt \
    && rm /tmp/libtorch.zip
COPY --from=sources /src /src
WORKDIR /src
# DMDSERVE_CUDA=ON compiles the CUDA paths (pool streams, CUDA graphs, the post-processing
# kernel); CMake stops with a clear message if the libtorch at LIBTORCH_URL is a CPU one.
ARG CUDA_ARCHITECTURES=80;90
RUN cmake -S . -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH=/opt/libtorch \
      -DDMDSERVE_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}" \
      -DDMDSERVE_BUILD_TESTS=OFF -DDMDSERVE_BUILD_BENCHMARKS=OFF -DDMDSERVE_BUILD_FUZZERS=OFF \
    && cmake --build /build --target dmdserve dmdctl \
    && mkdir -p /out/bin && cp /build/server/dmdserve /build/client/dmdctl /out/bin/
COPY scripts/container/runtime_packages.sh /usr/local/bin/
RUN SKIP_PREFIX=/opt/libtorch runtime_packages.sh /out/bin/dmdserve /out/bin/dmdctl \
      > /out/runtime-packages.txt

FROM nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-ubuntu24.04 AS cuda
ENV DEBIAN_FRONTEND=noninteractive
COPY --from=build-cuda /out/runtime-packages.txt /tmp/runtime-packages.txt
RUN apt-get update -q \
    && xargs -a /tmp/runtime-packages.txt apt-get install -y -q --no-install-recommends \
    && rm -rf /var/lib/apt/lists/* /tmp/runtime-packages.txt \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin dmdserve
COPY --from=build-cuda /opt/libtorch/lib /opt/libtorch/lib
COPY --from=build-cuda /out/bin/ /usr/local/bin/
COPY models /opt/dmdserve/models
ENV LD_LIBRARY_PATH=/opt/libtorch/lib \
    DMDSERVE_MODEL_DIRS=/opt/dmdserve/models/fashion-dmd,/opt/dmdserve/models/fashion-teacher \
    DMDSERVE_DEVICES=all
USER 10001
EXPOSE 50051 8080 9464
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s \
  CMD ["/usr/local/bin/dmdctl", "--target=127.0.0.1:50051", "health", "--timeout_s=3"]
ENTRYPOINT ["/usr/local/bin/dmdserve"]

# ---------------------------------------------------------------------------------------------
# CPU runtime (default target): only the shared libraries' packages, a non-root user, the
# embedded default model. Exec-form entrypoint, so SIGTERM reaches dmdserve (it drains).
FROM ${DEBIAN_IMAGE} AS cpu
ENV DEBIAN_FRONTEND=noninteractive
COPY --from=build /out/runtime-packages.txt /tmp/runtime-packages.txt
RUN apt-get update -q \
    && xargs -a /tmp/runtime-packages.txt apt-get install -y -q --no-install-recommends \
    && rm -rf /var/lib/apt/lists/* /tmp/runtime-packages.txt \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin dmdserve
COPY --from=build /out/bin/ /usr/local/bin/
COPY models /opt/dmdserve/models
ENV DMDSERVE_MODEL_DIRS=/opt/dmdserve/models/fashion-dmd,/opt/dmdserve/models/fashion-teacher
USER 10001
EXPOSE 50051 8080 9464
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s \
  CMD ["/usr/local/bin/dmdctl", "--target=127.0.0.1:50051", "health", "--timeout_s=3"]
ENTRYPOINT ["/usr/local/bin/dmdserve"]
