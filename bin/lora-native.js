#!/usr/bin/env node
// The `lora-native` command; the code lives in dist/lib/cli.js (built by `npm run build`).
'use strict';
process.exitCode = require('../dist/lib/cli.js').main(process.argv.slice(2));
