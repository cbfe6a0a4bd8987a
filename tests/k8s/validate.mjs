// Renders every kustomize overlay of deploy/k8s with `kubectl kustomize` and validates each object
// offline: the Kubernetes / Prometheus Operator schemas of npm's kubernetes-models (types,
// required fields, enums, formats), then the cross-object rules no schema expresses (selectors
// match the pod labels, probes, non-root, GPU limits). Exits 1 on any problem.
//   node validate.mjs [repo-root]
import { execFileSync } from "node:child_process";
import path from "node:path";
import YAML from "yaml";
import { ConfigMap, Service } from "kubernetes-models/v1";
import { Deployment } from "kubernetes-models/apps/v1";
import { HorizontalPodAutoscaler } from "kubernetes-models/autoscaling/v2";
import { PodDisruptionBudget } from "kubernetes-models/policy/v1";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const MODELS = {
  "v1/ConfigMap": ConfigMap,
  "v1/Service": Service,
  "apps/v1/Deployment": Deployment,
  "autoscaling/v2/HorizontalPodAutoscaler": HorizontalPodAutoscaler,
  "policy/v1/PodDisruptionBudget": PodDisruptionBudget,
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
};

const root = path.resolve(process.argv[2] ?? path.join(import.meta.dirname ?? ".", "..", ".."));
const problems = [];
const fail = (overlay, what) => problems.push(`${overlay}: ${what}`);
const matches = (selector, labels) =>
  Object.entries(selector ?? {}).every(([k, v]) => labels?.[k] === v);

for (const overlay of ["cpu", "gpu"]) {
  const dir = path.join(root, "deploy", "k8s", "overlays", overlay);
  const rendered = execFileSync("kubectl", ["kustomize", dir], { encoding: "utf8" });
  const objects = YAML.parseAllDocuments(rendered).map((d) => d.toJS());
  const byKind = {};
  for (const obj of objects) {
    const key = `${obj.apiVersion}/${obj.kind}`;
    const Model = MODELS[key];
    if (!Model) {
      fail(overlay, `no schema for ${key} (${obj.metadata?.name})`);
      continue;
    }
    try {
      new Model(obj).validate();
    } catch (e) {
      fail(overlay, `${key} ${obj.metadata?.name}: ${e.message}`);
    }
    (byKind[obj.kind] ??= []).push(obj);
  }
  for (const kind of ["ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler",
                      "PodDisruptionBudget", "ServiceMonitor"]) {
    if (!byKind[kind]) fail(overlay, `missing ${kind}`);
  }
  const deployment = byKind.Deployment?.[0];
  if (!deployment) continue;
  const pod = deployment.spec.template;
  const container = pod.spec.containers[0];
  if (!matches(deployment.spec.selector.matchLabels, pod.metadata.labels)) {
    fail(overlay, "Deployment selector does not match its pod labels");
  }
  for (const svc of byKind.Service ?? []) {
    if (!matches(svc.spec.selector, pod.metadata.labels)) {
      fail(overlay, `Service ${svc.metadata.name} selects no dmdserve pod`);
    }
  }
  for (const pdb of byKind.PodDisruptionBudget ?? []) {
    if (!matches(pdb.spec.selector.matchLabels, pod.metadata.labels)) {
      fail(overlay, "PodDisruptionBudget selects no dmdserve pod");
    }
  }
  for (const sm of byKind.ServiceMonitor ?? []) {
    const svc = (byKind.Service ?? []).find((s) => matches(sm.spec.selector.matchLabels, s.metadata.labels));
    if (!svc || !svc.spec.ports.some((p) => p.name === sm.spec.endpoints[0].port)) {
      fail(overlay, "ServiceMonitor matches no Service port");
    }
  }
  const hpa = byKind.HorizontalPodAutoscaler?.[0];
  if (hpa && hpa.spec.scaleTargetRef.name !== deployment.metadata.name) {
    fail(overlay, "HPA does not target the Deployment");
  }
  for (const probe of ["startupProbe", "readinessProbe", "livenessProbe"]) {
    if (!container[probe]?.grpc) fail(overlay, `${probe} is not a native gRPC probe`);
  }
  const sec = { ...pod.spec.securityContext, ...container.securityContext };
  if (!sec.runAsNonRoot || !container.securityContext?.readOnlyRootFilesystem) {
    fail(overlay, "pod must run as non-root with a read-only root filesystem");
  }
  const configMap = (byKind.ConfigMap ?? []).find((c) => c.metadata.name === "dmdserve-flags");
  const drain = Number(configMap?.data?.DMDSERVE_DRAIN_GRACE_S ?? 30);
  const preStop = container.lifecycle?.preStop?.sleep?.seconds ?? 0;
  if (!(pod.spec.terminationGracePeriodSeconds > drain + preStop)) {
    fail(overlay, `terminationGracePeriodSeconds must exceed preStop ${preStop} s + drain ${drain} s`);
  }
  const gpus = container.resources?.limits?.["nvidia.com/gpu"];
  if (overlay === "gpu" && gpus !== "1") fail(overlay, "gpu overlay needs an nvidia.com/gpu limit");
  if (overlay === "cpu" && gpus !== undefined) fail(overlay, "cpu overlay must not request GPUs");
  if (overlay === "gpu" && configMap?.data?.DMDSERVE_DEVICE !== "cuda:0") {
    fail(overlay, "gpu overlay must set DMDSERVE_DEVICE=cuda:0");
  }
  console.log(`${overlay}: ${objects.length} objects checked`);
}

if (problems.length) {
  for (const p of problems) console.error(`FAIL ${p}`);
  process.exit(1);
}
console.log("all overlays valid");
