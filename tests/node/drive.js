#!/usr/bin/env node
/*
 * Drives the repository's XML web service with Smart DCC's own client library,
 * @smartdcc/dccboxed-keystore (unmodified), for tests/test_dccboxed_client.py.
 *
 * Input: a JSON plan, as the first argument or on stdin:
 *   {"url": "http://127.0.0.1:PORT/",
 *    "ops": [
 *      {"op": "search", "q": {"CertificateSubjectAltName": "00-db-..."},
 *       "usage": "DS", "status": "I"},                       // device search
 *      {"op": "search", "q": {"CertificateSubjectName": "90-b3-..."},
 *       "usage": "KA", "status": "I", "role": "2"},          // organisation search
 *      {"op": "query", "serial": "71c5..."},                  // retrieve by serial
 *      {"op": "keystore", "eui": "00-db-...", "keyUsage": "DS"},  // BoxedKeyStore by EUI
 *      {"op": "keystoreSerial", "serial": "71c5..."}          // BoxedKeyStore by serial
 *    ]}
 *
 * Output: one JSON object per operation, one per line, in plan order:
 *   {"result": ...} or {"error": "message"}, with the operation's "id" if it had one.
 * A certificate is described as
 *   {serial, x509Serial, eui, role, keyUsage: [names], der: base64}
 * where serial is the library's metadata serial (upper-case hex), x509Serial is Node's
 * X509Certificate.serialNumber and der is the certificate the library holds.
 */
'use strict';

const fs = require('node:fs');
const { search, query } = require('@smartdcc/dccboxed-keystore/dist/certificateSearch');
const { BoxedKeyStore, KeyUsage } = require('@smartdcc/dccboxed-keystore');

const USAGE = { DS: KeyUsage.digitalSignature, KA: KeyUsage.keyAgreement };

function describe(meta, x509) {
  return {
    serial: BigInt(meta.serial).toString(16).toUpperCase(),
    x509Serial: x509.serialNumber,
    eui: meta.eui === undefined ? null : meta.eui.toString(),
    role: meta.role === undefined ? null : meta.role,
    keyUsage: (meta.keyUsage || []).map((k) => KeyUsage[k]),
    der: Buffer.from(x509.raw).toString('base64'),
  };
}

/* BoxedKeyStore answers are the metadata spread with `certificate` (an X509Certificate) */
function describeEntry(entry) {
  return describe(entry, entry.certificate);
}

async function run(op, url, store) {
  switch (op.op) {
    case 'search': {
      const sr = { CertificateUsage: op.usage, CertificateStatus: op.status || 'I', q: op.q };
      if (op.role !== undefined) sr.CertificateRole = op.role;
      const found = await search(sr, url);
      return found.map(({ meta, x509 }) => describe(meta, x509));
    }
    case 'query': {
      const r = await query(op.serial, url);
      return r === null ? null : describe(r.meta, r.x509);
    }
    case 'keystore': {
      const r = await (await store()).query({
        eui: op.eui, keyUsage: USAGE[op.keyUsage], lookup: 'certificate',
      });
      if (r === null) return null;
      return Array.isArray(r) ? r.map(describeEntry) : [describeEntry(r)];
    }
    case 'keystoreSerial': {
      const r = await (await store()).query({
        serial: BigInt('0x' + op.serial), lookup: 'certificate',
      });
      return r === null ? null : describeEntry(r);
    }
    default:
      throw new Error(`unknown op ${JSON.stringify(op.op)}`);
  }
}

async function main() {
  const text = process.argv[2] !== undefined ? process.argv[2] : fs.readFileSync(0, 'utf8');
  const plan = JSON.parse(text);
  let keyStore = null;
  const store = async () => {
    if (keyStore === null) keyStore = await BoxedKeyStore.new(plan.url);
    return keyStore;
  };
  try {
    for (const op of plan.ops) {
      const line = op.id === undefined ? {} : { id: op.id };
      try {
        line.result = await run(op, plan.url, store);
      } catch (err) {
        line.error = String(err && err.message ? err.message : err);
        if (err && err.code) line.code = err.code;
      }
      process.stdout.write(JSON.stringify(line) + '\n');
    }
  } finally {
    if (keyStore !== null) await keyStore.cleanup();
  }
}

main().catch((err) => {
  process.stderr.write(`drive.js: ${err && err.stack ? err.stack : err}\n`);
  process.exit(2);
});
