#!/usr/bin/env node
// The `lora-native` command; the code lives in dist/lib/cli.js (built by `npm run build`).
'use strict';
require('../dist/lib/cli.js').main(process.argv.slice(2)).then((code) => { process.exitCode = code; });
