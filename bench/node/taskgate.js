// What both benchmark programs need: the TaskService client class, loaded from the repository's
// proto, and channels that each keep an HTTP/2 connection of their own.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const ROOT = path.join(__dirname, "..", "..", "proto");
const definition = protoLoader.loadSync(path.join(ROOT, "taskgate", "v1", "task_service.proto"), {
  keepCase: true,
  enums: String,
  longs: Number,
  defaults: false,
  oneofs: true,
  includeDirs: [ROOT],
});
const { TaskService } = grpc.loadPackageDefinition(definition).taskgate.v1;

// `count` TaskService clients of `target`, each on a subchannel pool (a connection) of its own.
function clients(target, count) {
  const made = [];
  for (let i = 0; i < count; i++) {
    made.push(new TaskService(target, grpc.credentials.createInsecure(), { "grpc.use_local_subchannel_pool": 1 }));
  }
  return made;
}

// "--name value" pairs over `defaults`.
function options(argv, defaults) {
  const parsed = { ...defaults };
  for (let i = 0; i < argv.length; i += 2) parsed[argv[i].replace(/^--/, "")] = argv[i + 1];
  return parsed;
}

module.exports = { clients, options };
