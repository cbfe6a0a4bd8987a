// Renders every kustomize overlay of deploy/k8s with `kubectl kustomize` and validates each object
// offline: the Kubernetes / Prometheus Operator schemas of npm's kubernetes-models (types,
// required fields, enums, formats), then the cross-object rules no schema expresses (selectors
// match the pod labels, probes, non-root, GPU limits). Exits 1 on any problem.
//   node validate.mjs [repo-root]
import { execFileSync } from "node:child_process";
import fs from "node:fs";
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

// Unknown fields: the compiled schemas accept them, so walk the objects against the property
// lists of the packages' TypeScript interfaces (core Kubernetes kinds; the ServiceMonitor CRD's
// types are inline and keep schema-only validation).
const STRICT_TYPES = {
  ConfigMap: "IIoK8sApiCoreV1ConfigMap",
  Service: "IIoK8sApiCoreV1Service",
  Deployment: "IIoK8sApiAppsV1Deployment",
  HorizontalPodAutoscaler: "IIoK8sApiAutoscalingV2HorizontalPodAutoscaler",
  PodDisruptionBudget: "IIoK8sApiPolicyV1PodDisruptionBudget",
};

function loadInterfaces() {
  const types = new Map();
  const here = path.dirname(new URL(import.meta.url).pathname);
  const dirs = ["kubernetes-models", "@kubernetes-models/apimachinery"].map((d) =>
    path.join(here, "node_modules", d));
  const files = dirs.flatMap((d) => fs.readdirSync(d, { recursive: true })
    .filter((f) => f.endsWith(".d.ts")).map((f) => path.join(d, f)));
  for (const file of files) {
    const text = fs.readFileSync(file, "utf8");
    const local = new Map();
    for (const m of text.matchAll(/^export interface (\w+)(?: extends ([\w, ]+))? \{\n([\s\S]*?)\n\}/gm)) {
      const props = new Map();
      for (const line of m[3].split("\n")) {
        const p = /^ {4}"([^"]+)"\??: (.*?);?$/.exec(line);
        if (p) props.set(p[1], p[2].trim());
      }
      if ((m[2] ?? "").includes("TypeMeta")) {
        props.set("apiVersion", "string");
        props.set("kind", "string");
      }
      local.set(m[1], props);
    }
    for (const m of text.matchAll(/export type \{ (\w+) as (\w+)/g)) {
      if (local.has(m[1])) types.set(m[2], local.get(m[1]));
    }
  }
  return types;
}
const INTERFACES = loadInterfaces();

// Appends "path: unknown field" for every key that `type` does not declare, recursively.
function unknownFields(value, type, where, out) {
  if (value === null || typeof value !== "object") return;
  const element = /^Array<(I\w+)>$/.exec(type);
  if (Array.isArray(value)) {
    if (element) value.forEach((v, i) => unknownFields(v, element[1], `${where}[${i}]`, out));
    return;
  }
  const props = INTERFACES.get(type);
  if (!props) return;  // a leaf type (string, quantity, int-or-string) or an inline map
  for (const [key, v] of Object.entries(value)) {
    if (!props.has(key)) {
      out.push(`${where}.${key}: unknown field`);
      continue;
    }
    const t = props.get(key);
    if (/^(I\w+|Array<I\w+>)$/.test(t)) unknownFields(v, t, `${where}.${key}`, out);
  }
}

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
    if (STRICT_TYPES[obj.kind]) {
      if (!INTERFACES.has(STRICT_TYPES[obj.kind])) fail(overlay, `no field list for ${obj.kind}`);
      const unknown = [];
      unknownFields(obj, STRICT_TYPES[obj.kind], `${obj.kind}/${obj.metadata?.name}`, unknown);
      for (const u of unknown) fail(overlay, u);
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
  if (overlay === "gpu" && configMap?.data?.DMDSERVE_DEVICES !== "all") {
    fail(overlay, "gpu overlay must set DMDSERVE_DEVICES=all");
  }
  console.log(`${overlay}: ${objects.length} objects checked`);
}

if (problems.length) {
  for (const p of problems) console.error(`FAIL ${p}`);
  process.exit(1);
}
console.log("all overlays valid");
