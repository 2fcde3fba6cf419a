// The stream benchmark's Node client: `node streamclient.js --target H:P --ids FILE [--channels N]
// [--opening N] [--timeout S]`, the same protocol as `python -m bench.streamclient watch`.
//
// Opens one StreamProgress per id (spread over several channels, each its own HTTP/2
// connection; at most `opening` streams waiting for their snapshot at a time), prints
// `open <opened> <failed>` once every stream has its snapshot, reads until every stream ended
// and prints one JSON line: how many streams saw the terminal update, and the delay of every
// message that carries the writer's send time (CLOCK_MONOTONIC seconds in
// `progress.details.sent` or `result.sent`), in milliseconds. process.hrtime reads
// CLOCK_MONOTONIC, the clock of Python's time.monotonic() in the writer.
"use strict";

const fs = require("fs");
const { PerformanceObserver } = require("perf_hooks");
const { clients: connect, options: parse } = require("./taskgate");
const TERMINAL = new Set(["TASK_STATE_SUCCEEDED", "TASK_STATE_FAILED", "TASK_STATE_CANCELLED"]);

function options(argv) {
  const parsed = parse(argv, { channels: 4, opening: 200, timeout: 600 });
  if (!parsed.target || !parsed.ids) throw new Error("usage: streamclient.js --target H:P --ids FILE");
  return parsed;
}

const monotonic = () => Number(process.hrtime.bigint()) / 1e9;

// The writer's send time in a message, or undefined (well-known types keep camelCase names).
function sentOf(task) {
  const fields = TERMINAL.has(task.state)
    ? task.result && task.result.structValue && task.result.structValue.fields
    : task.progress && task.progress.details && task.progress.details.fields;
  return fields && fields.sent ? fields.sent.numberValue : undefined;
}

function main() {
  const args = options(process.argv.slice(2));
  const ids = fs.readFileSync(args.ids, "utf8").split(/\s+/).filter(Boolean);
  const clients = connect(args.target, Number(args.channels));
  const tally = { opened: 0, failed: 0, terminal: 0, messages: 0, errors: 0, first_error: "",
                  progress_ms: [], success_ms: [], gc_pauses_ms: [] };
  // delays go to typed arrays: no heap object per message for the collector to copy
  const delays = { progress: new Float64Array(ids.length), success: new Float64Array(ids.length) };
  const counts = { progress: 0, success: 0 };
  // this process's own garbage-collection pauses once every stream is open: a client-side
  // delay the report shows next to the delays
  new PerformanceObserver((list) => {
    if (!announced) return;
    for (const entry of list.getEntries()) tally.gc_pauses_ms.push(Math.round(entry.duration * 1000) / 1000);
  }).observe({ entryTypes: ["gc"] });
  let waiting = 0; // streams started and still without their snapshot
  let next = 0; // the next id to open
  let ended = 0;
  let announced = false;

  const error = (err) => {
    tally.errors += 1;
    tally.first_error = tally.first_error || String(err.details || err.message).slice(0, 300);
  };
  const finish = () => {
    for (const kind of ["progress", "success"]) {
      tally[`${kind}_ms`] = Array.from(delays[kind].subarray(0, counts[kind]), (ms) => Math.round(ms * 1e3) / 1e3);
    }
    process.stdout.write(JSON.stringify(tally) + "\n", () => process.exit(0));
  };
  const oneEnded = () => {
    ended += 1;
    if (ended === ids.length) finish();
  };
  const maybeAnnounce = () => {
    if (!announced && tally.opened + tally.failed === ids.length) {
      announced = true;
      process.stdout.write(`open ${tally.opened} ${tally.failed}\n`);
    }
  };

  const open = () => {
    while (waiting < Number(args.opening) && next < ids.length) {
      const index = next++;
      waiting += 1;
      let first = true;
      // the stream's first message (its snapshot) or its failure frees a place to open another
      const settled = (outcome) => {
        first = false;
        waiting -= 1;
        tally[outcome] += 1;
        maybeAnnounce();
        setImmediate(open);
      };
      const stream = clients[index % clients.length].StreamProgress({ task_id: ids[index] });
      stream.on("data", ({ task }) => {
        if (first) {
          settled("opened");
          return;
        }
        const now = monotonic();
        tally.messages += 1;
        const sent = sentOf(task);
        const terminal = TERMINAL.has(task.state);
        if (terminal) tally.terminal += 1;
        const kind = terminal ? "success" : "progress";
        if (sent !== undefined && counts[kind] < ids.length) delays[kind][counts[kind]++] = (now - sent) * 1e3;
      });
      stream.on("error", (err) => {
        if (first) settled("failed");
        error(err);
      });
      stream.on("status", oneEnded); // once per call, whatever its outcome
    }
  };

  if (ids.length === 0) {
    process.stdout.write("open 0 0\n");
    finish();
    return;
  }
  setTimeout(() => {
    tally.first_error = tally.first_error || "timed out before every stream ended";
    finish();
  }, Number(args.timeout) * 1000).unref();
  open();
}

main();
