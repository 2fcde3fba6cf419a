// Enqueue demo.progress through taskgate and stream its progress to the end.
// Usage: node index.js [host:port] [steps]   (default 127.0.0.1:50051, 5 steps)
// Exits 0 when the task SUCCEEDED, 1 otherwise.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO = path.join(__dirname, "..", "..", "proto", "taskgate", "v1", "task_service.proto");
const definition = protoLoader.loadSync(PROTO, {
  keepCase: true,
  enums: String,
  longs: Number,
  defaults: false,
  oneofs: true,
  includeDirs: [path.join(__dirname, "..", "..", "proto")],
});
const { TaskService } = grpc.loadPackageDefinition(definition).taskgate.v1;

const target = process.argv[2] || "127.0.0.1:50051";
const steps = Number(process.argv[3] || 5);
const client = new TaskService(target, grpc.credentials.createInsecure());

const TERMINAL = new Set(["TASK_STATE_SUCCEEDED", "TASK_STATE_FAILED", "TASK_STATE_CANCELLED"]);

function enqueue() {
  const request = {
    task_name: "demo.progress",
    // google.protobuf well-known types keep protobufjs's camelCase field names
    args: { values: [{ numberValue: steps }] },
    kwargs: { fields: { interval: { numberValue: 0.1 } } },
  };
  return new Promise((resolve, reject) => {
    client.Enqueue(request, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

function watch(taskId) {
  return new Promise((resolve, reject) => {
    let last = null;
    const stream = client.StreamProgress({ task_id: taskId });
    stream.on("data", ({ task }) => {
      last = task;
      const p = task.progress || {};
      console.log(`${task.state} ${p.current ?? 0}/${p.total ?? 0} ${p.message ?? ""}`);
    });
    stream.on("error", reject);
    stream.on("end", () => resolve(last));
  });
}

async function main() {
  const { task_id: taskId } = await enqueue();
  console.log(`enqueued demo.progress as ${taskId}`);
  const task = await watch(taskId);
  if (!task || !TERMINAL.has(task.state)) throw new Error("stream ended before a terminal state");
  const result = task.result ? task.result.numberValue : undefined;
  console.log(`done: ${task.state} result=${result}`);
  client.close();
  return task.state === "TASK_STATE_SUCCEEDED" ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(`failed: ${err.code !== undefined ? `gRPC ${err.code}: ` : ""}${err.details || err.message}`);
    process.exit(1);
  },
);
