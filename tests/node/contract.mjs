// A Node.js client of align2 built from protos/align2/v1/curation.proto alone (no generated
// code): @grpc/grpc-js + @grpc/proto-loader. Run by tests/integration/test_foreign_clients.py.
//
// Usage: node tests/node/contract.mjs HOST:PORT IMAGE_FILE
// Calls Score, Align, Curate, GetServerInfo and grpc.health.v1.Health/Check; exits 1 with a
// message on the first mismatch, else prints a one-line JSON summary.

import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

const HERE = dirname(fileURLToPath(import.meta.url));
const PROTOS = join(HERE, '..', '..', 'protos');
const LOAD_OPTIONS = {
  keepCase: true,
  enums: String,
  longs: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTOS, HERE],
};
const DECISIONS = new Set([
  'DECISION_KEPT',
  'DECISION_DROPPED_QUESTION',
  'DECISION_DROPPED_ANSWER',
  'DECISION_ERROR',
  'DECISION_KEPT_ALIGN_FAILED',
]);
const TIMEOUT_MS = 120_000;

class Mismatch extends Error {}

function check(condition, message, value) {
  if (!condition) {
    const shown = value === undefined ? '' : `: ${JSON.stringify(value)}`;
    throw new Mismatch(`${message}${shown}`);
  }
}

function load(file) {
  return grpc.loadPackageDefinition(protoLoader.loadSync(file, LOAD_OPTIONS));
}

function deadline() {
  return { deadline: Date.now() + TIMEOUT_MS };
}

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, deadline(), (error, reply) => (error ? reject(error) : resolve(reply)));
  });
}

function sample(id, image) {
  return {
    id,
    image,
    task: 'conversation',
    turns: [{ question: 'What is in the image?', answer: 'A red box on a plain ground.' }],
  };
}

async function score(client, image) {
  const good = sample('good', image);
  const bad = sample('bad', Buffer.from('not an image'));
  const reply = await unary(client, 'Score', { samples: [good, bad] });
  check(reply.results.length === 2, 'Score: one result per sample', reply.results.length);
  const [ok, failed] = reply.results;
  check(ok.id === 'good' && failed.id === 'bad', 'Score: results in request order');
  check(ok.error === null, 'Score: the valid sample has no error', ok.error);
  check(Number.isFinite(ok.question_score), 'Score: finite question_score', ok.question_score);
  check(ok.answer_scores.length === 1, 'Score: one answer score per turn', ok.answer_scores);
  check(ok.answer_scores.every(Number.isFinite), 'Score: finite answer_scores', ok.answer_scores);
  check(Number.isFinite(ok.answer_score), 'Score: finite answer_score', ok.answer_score);
  check(failed.error?.code === 'ERROR_CODE_INVALID_ARGUMENT', 'Score: bad image', failed.error);
  check(failed.question_score == null, 'Score: no question score on error', failed);
  check(failed.answer_score == null, 'Score: no answer score on error', failed);
  check(failed.answer_scores.length === 0, 'Score: no answer scores on error', failed);
  return { question_score: ok.question_score, bad_error: failed.error.code };
}

async function align(client, image) {
  const given = sample('a1', image);
  given.turns.push({ question: 'What colour is it?', answer: 'It is red.' });
  const options = { decoding: { max_new_tokens: 4 } };
  const reply = await unary(client, 'Align', { samples: [given], options });
  check(reply.results.length === 1, 'Align: one result', reply.results.length);
  const [result] = reply.results;
  check(result.error === null, 'Align: no error', result.error);
  check(result.turns.length === given.turns.length, 'Align: one AlignedTurn per turn', result);
  for (const turn of result.turns) {
    check(['KEPT_ORIGINAL', 'KEPT_REWRITE'].includes(turn.kept), 'Align: kept', turn.kept);
  }
  return result.turns.map((turn) => turn.kept);
}

function curate(client, image) {
  return new Promise((resolve, reject) => {
    const decisions = [];
    const call = client.Curate(deadline());
    call.on('data', (reply) => decisions.push(reply));
    call.on('error', reject);
    call.on('end', () => resolve(decisions));
    call.write({ options: { question_keep_fraction: 0.5, align: false } });
    for (const id of ['', '', 'dup', 'dup']) {
      call.write({ sample: sample(id, image) });
    }
    call.end();
  }).then((decisions) => {
    check(decisions.length === 4, 'Curate: one decision per sample', decisions.length);
    const sequences = decisions.map((d) => Number(d.sequence)).sort((a, b) => a - b);
    check(sequences.join() === '0,1,2,3', 'Curate: sequences 0..3', sequences);
    for (const d of decisions) {
      check(DECISIONS.has(d.decision), 'Curate: a DECISION_* name', d.decision);
    }
    return decisions.map((d) => d.decision);
  });
}

async function serverInfo(client) {
  const info = await unary(client, 'GetServerInfo', {});
  check(info.version !== '', 'GetServerInfo: version', info.version);
  for (const service of ['Score', 'Align', 'Curate']) {
    check(info.services.includes(service), `GetServerInfo: ${service} enabled`, info.services);
  }
  check(info.models.length >= 2, 'GetServerInfo: models', info.models);
  check(Number(info.limits.max_image_bytes) > 0, 'GetServerInfo: limits', info.limits);
  return info.services;
}

async function health(target) {
  const { Health } = load(join(HERE, 'health.proto')).grpc.health.v1;
  const client = new Health(target, grpc.credentials.createInsecure());
  try {
    const statuses = [];
    for (const service of ['', 'align2.v1.CurationService']) {
      const reply = await unary(client, 'Check', { service });
      check(reply.status === 'SERVING', `Health/Check(${JSON.stringify(service)})`, reply);
      statuses.push(reply.status);
    }
    return statuses;
  } finally {
    client.close();
  }
}

async function main([target, imageFile]) {
  check(target && imageFile, 'usage: node contract.mjs HOST:PORT IMAGE_FILE');
  const image = readFileSync(imageFile);
  const { CurationService } = load('align2/v1/curation.proto').align2.v1;
  const client = new CurationService(target, grpc.credentials.createInsecure());
  try {
    const summary = {
      score: await score(client, image),
      align_kept: await align(client, image),
      curate_decisions: await curate(client, image),
      services: await serverInfo(client),
      health: await health(target),
    };
    console.log(JSON.stringify(summary));
  } finally {
    client.close();
  }
}

main(process.argv.slice(2)).catch((error) => {
  const kind = error instanceof Mismatch ? 'contract mismatch' : 'call failed';
  console.error(`align2 node client: ${kind}: ${error.message}`);
  process.exit(1);
});
