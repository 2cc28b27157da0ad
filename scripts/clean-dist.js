#!/usr/bin/env node
// Removes dist/ before tsc writes it again: a file left from a source that no longer exists
// (lib/ops.js after lib/ops.ts became lib/ops/index.ts) would shadow the new module at require().
'use strict';

require('fs').rmSync(require('path').join(__dirname, '..', 'dist'), { recursive: true, force: true });
