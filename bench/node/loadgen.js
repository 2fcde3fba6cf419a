// The Enqueue load generator in Node: `node loadgen.js --target H:P [--concurrency N] [--warmup S]
// [--duration S] [--channels N]` prints one JSON line with the fields of bench.drive.LoadResult.
//
// The same closed loop as `python -m bench.loadgen` (bench/drive.py): `concurrency` workers,
// each with one Enqueue in flight at a time, spread over `channels` HTTP/2 connections; the
// calls that complete in the `duration` seconds after `warmup` are counted and timed. The
// bench drives taskgate with both (Node and Python callers are both what it serves): with
// this one the gateway spends less CPU per call (0.42 against 0.52 ms in one run), the load
// generator itself about the same (0.21 ms per call).
"use strict";

const { performance } = require("perf_hooks");
const { clients: connect, options: parse } = require("./taskgate");

function options(argv) {
  const parsed = parse(argv, { concurrency: 64, warmup: 1, duration: 5, channels: 2 });
  if (!parsed.target) throw new Error("usage: loadgen.js --target H:P");
  return parsed;
}

// nearest rank, as bench.drive.percentile
function percentile(sorted, q) {
  if (sorted.length === 0) return NaN;
  const rank = Math.max(0, Math.min(sorted.length - 1, Math.round((q / 100) * sorted.length + 0.5) - 1));
  return sorted[rank];
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function main() {
  const args = options(process.argv.slice(2));
  const clients = connect(args.target, Number(args.channels));
  await Promise.all(clients.map((client) => new Promise((resolve, reject) => {
    client.waitForReady(Date.now() + 15000, (err) => (err ? reject(err) : resolve()));
  })));
  const request = { task_name: "demo.add", args: { values: [{ numberValue: 2 }, { numberValue: 3 }] } };
  const enqueue = (client) => new Promise((resolve, reject) => {
    client.Enqueue(request, { deadline: Date.now() + 30000 }, (err, response) => (err ? reject(err) : resolve(response)));
  });

  const latencies = [];
  let errors = 0;
  let finished = 0;
  let firstError = "";
  let cpuStart = null;
  const start = performance.now() + Number(args.warmup) * 1000;
  const end = start + Number(args.duration) * 1000;

  async function worker(client) {
    for (;;) {
      const t0 = performance.now();
      if (t0 >= end) return;
      if (cpuStart === null && t0 >= start) cpuStart = process.cpuUsage();
      try {
        await enqueue(client);
      } catch (err) {
        errors += 1;
        firstError = firstError || String(err.details || err.message).slice(0, 300);
        await sleep(10); // do not spin on a dead server
        continue;
      }
      const t1 = performance.now();
      finished += 1;
      if (start <= t1 && t1 < end) latencies.push(t1 - t0);
    }
  }

  const workers = [];
  for (let i = 0; i < Number(args.concurrency); i++) workers.push(worker(clients[i % clients.length]));
  await Promise.all(workers);
  const used = process.cpuUsage(cpuStart || process.cpuUsage());
  const elapsed = Number(args.duration);
  latencies.sort((a, b) => a - b);
  const result = {
    completed: latencies.length,
    errors,
    elapsed,
    rate: elapsed > 0 ? latencies.length / elapsed : 0,
    p50: percentile(latencies, 50),
    p90: percentile(latencies, 90),
    p99: percentile(latencies, 99),
    max: latencies.length ? latencies[latencies.length - 1] : NaN,
    total_calls: finished,
    client_cpu: elapsed > 0 ? (used.user + used.system) / 1e6 / elapsed : 0,
    first_error: firstError,
  };
  for (const client of clients) client.close();
  // Python's json reads NaN (no latencies at all), JSON.stringify would write null
  const text = JSON.stringify(result, (key, value) => (Number.isNaN(value) ? "__NaN__" : value));
  process.stdout.write(text.replace(/"__NaN__"/g, "NaN") + "\n");
}

main().catch((err) => {
  process.stderr.write(`loadgen failed: ${err.stack || err}\n`);
  process.exit(1);
});
