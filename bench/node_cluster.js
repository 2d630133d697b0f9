// Node's cluster module serving the 13-byte "Hello, World!" of bench/hello_app.py: the
// peer bench/reliability.py measures trioherd against (see docs/reliability.md).
//
//   node bench/node_cluster.js PORT [WORKERS]     (listens on 127.0.0.1:PORT, 2 workers)
//
// The primary does what a small production wrapper (or PM2) does around `cluster`:
// - re-forks a worker that exited, unless the primary retired it or is stopping;
// - SIGHUP: rolling restart, one worker at a time: fork the new one, wait until it
//   listens, then disconnect the old one (it closes its server and exits when its
//   connections are done);
// - SIGTERM/SIGINT: disconnect every worker, exit 0 when all are gone (at most 10 s).
// A worker that gets SIGTERM closes its server, lets open connections finish and exits
// (at most 10 s); the primary then forks a replacement.
// The scheduling policy is Node's default on Linux: the primary accepts and hands each
// connection to a worker in turn (SCHED_RR), as trioherd does.
"use strict";

const cluster = require("node:cluster");
const http = require("node:http");

const port = Number(process.argv[2] || 8000);
const count = Number(process.argv[3] || 2);
const BODY = "Hello, World!";

if (cluster.isPrimary) {
  let stopping = false;
  let rolling = false;
  const retiring = new Set();

  const live = () => Object.values(cluster.workers).filter((w) => w && !w.isDead());

  for (let i = 0; i < count; i++) cluster.fork();

  cluster.on("exit", (worker) => {
    if (stopping) {
      if (live().length === 0) process.exit(0);
      return;
    }
    if (retiring.delete(worker.id)) return;
    cluster.fork();
  });

  // Resolves when WORKER listens, or exits first (a replacement that died).
  const listeningOrExit = (worker) =>
    new Promise((resolve) => {
      worker.once("listening", () => resolve(true));
      worker.once("exit", () => resolve(false));
    });

  process.on("SIGHUP", async () => {
    if (rolling || stopping) return;
    rolling = true;
    try {
      for (const old of live()) {
        if (stopping) break;
        const fresh = cluster.fork();
        if (!(await listeningOrExit(fresh))) break;
        if (old.isDead()) continue;
        retiring.add(old.id);
        old.disconnect();
      }
    } finally {
      rolling = false;
    }
  });

  const stop = () => {
    if (stopping) return;
    stopping = true;
    const workers = live();
    if (workers.length === 0) process.exit(0);
    for (const worker of workers) worker.disconnect();
    setTimeout(() => process.exit(1), 10000).unref();
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
} else {
  const server = http.createServer((req, res) => {
    // /block?s=N blocks this worker's loop for N seconds (bench/reliability.py's
    // "blocked" experiment), as time.sleep does in bench/hello_app.py
    const blocked = /^\/block\?s=([0-9.]+)$/.exec(req.url);
    if (blocked) {
      const until = Date.now() + Math.min(Number(blocked[1]), 120) * 1000;
      while (Date.now() < until);
    }
    res.writeHead(200, { "content-type": "text/plain", "content-length": "13" });
    res.end(BODY);
  });
  server.listen(port, "127.0.0.1");
  process.on("SIGTERM", () => {
    server.close(() => process.exit(0));
    server.closeIdleConnections();
    setTimeout(() => process.exit(0), 10000).unref();
  });
}
