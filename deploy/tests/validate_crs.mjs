// Validates the custom resources of deploy/ offline, in two independent ways, because either
// alone lets mistakes through:
//  1. schema: each object through its model's JSON-schema validator from the npm packages
//     @kubernetes-models/prometheus-operator and @kubernetes-models/cert-manager (generated from
//     the projects' Go API types): types, required fields, enums, patterns (durations such as
//     `interval: 15s`). These schemas accept unknown fields, as the API server would with
//     pruning: a misspelt `jobLable` would be dropped silently and every alert would look for a
//     job that does not exist.
//  2. fields: each object as a typed TypeScript literal of the same packages' interfaces,
//     compiled with `tsc --noEmit`: excess-property checking rejects every unknown field, at any
//     depth, naming it.
//
// Usage: node validate_crs.mjs OBJECTS.json
//   OBJECTS.json: [{"source": "file", "object": {...}}, ...] as written by
//   validate_manifests.py --custom-out. Prints one line per problem; exits 1 on any.

import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import * as monitoring from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
import * as certmanager from "@kubernetes-models/cert-manager/cert-manager.io/v1";

const HERE = dirname(fileURLToPath(import.meta.url));

// apiVersion/kind -> [model class, TypeScript module, interface name]
const KINDS = {
  "monitoring.coreos.com/v1/ServiceMonitor": [monitoring.ServiceMonitor,
    "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor", "IServiceMonitor"],
  "monitoring.coreos.com/v1/PrometheusRule": [monitoring.PrometheusRule,
    "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule", "IPrometheusRule"],
  "monitoring.coreos.com/v1/PodMonitor": [monitoring.PodMonitor,
    "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor", "IPodMonitor"],
  "cert-manager.io/v1/Certificate": [certmanager.Certificate,
    "@kubernetes-models/cert-manager/cert-manager.io/v1/Certificate", "ICertificate"],
  "cert-manager.io/v1/Issuer": [certmanager.Issuer,
    "@kubernetes-models/cert-manager/cert-manager.io/v1/Issuer", "IIssuer"],
  "cert-manager.io/v1/ClusterIssuer": [certmanager.ClusterIssuer,
    "@kubernetes-models/cert-manager/cert-manager.io/v1/ClusterIssuer", "IClusterIssuer"],
};

function describe(entry) {
  const o = entry.object;
  const ns = o.metadata?.namespace ? `${o.metadata.namespace}/` : "";
  return `${entry.source}: ${o.kind}/${ns}${o.metadata?.name} (${o.apiVersion})`;
}

const entries = JSON.parse(readFileSync(process.argv[2], "utf8"));
const problems = [];
const typed = [];

for (const entry of entries) {
  const o = entry.object;
  const known = KINDS[`${o.apiVersion}/${o.kind}`];
  if (!known) {
    problems.push(`${describe(entry)}: no schema known for this kind (add it to validate_crs.mjs)`);
    continue;
  }
  const [Model] = known;
  try {
    new Model(o).validate();
  } catch (e) {
    problems.push(`${describe(entry)}: schema: ${e.message}`);
  }
  typed.push([entry, known]);
}

// Field check: one typed constant per object, one object per line, so that tsc's line
// numbers name the object.
if (typed.length > 0) {
  // Inside this directory, so that module resolution finds ./node_modules.
  const dir = mkdtempSync(join(HERE, ".objects-"));
  try {
    const imports = new Map();
    for (const [, [, module, iface]] of typed) imports.set(iface, module);
    const header = [...imports].map(([iface, module]) => `import type { ${iface} } from "${module}";`);
    const body = typed.map(([entry, [, , iface]], i) =>
      `export const o${i}: ${iface} = ${JSON.stringify(entry.object)};`);
    const file = join(dir, "objects.ts");
    writeFileSync(file, [...header, ...body, ""].join("\n"));
    const tsc = join(HERE, "node_modules", "typescript", "bin", "tsc");
    let output = "";
    try {
      execFileSync(process.execPath, [tsc, "--noEmit", "--strict", "--skipLibCheck",
        "--module", "nodenext", "--moduleResolution", "nodenext", file],
        { cwd: HERE, encoding: "utf8", stdio: "pipe" });
    } catch (e) {
      output = `${e.stdout ?? ""}${e.stderr ?? ""}`;
      if (!output.trim()) output = String(e);
    }
    for (const line of output.split("\n").filter((l) => l.trim())) {
      const m = line.match(/objects\.ts\((\d+),\d+\): error (TS\d+: .*)/);
      const index = m ? Number(m[1]) - header.length - 1 : -1;
      if (m && index >= 0 && index < typed.length) {
        problems.push(`${describe(typed[index][0])}: fields: ${m[2]}`);
      } else if (!/^\s/.test(line)) {
        problems.push(`tsc: ${line}`);
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

for (const p of problems) console.log(`FAIL ${p}`);
console.log(`${entries.length} custom resources: schema and unknown-field checks; ${problems.length} problems`);
process.exit(problems.length ? 1 : 0);
