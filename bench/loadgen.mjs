// The load generator of bench/run.py: mediators calling MPR over WebSocket, written for Node so
// that the generator costs far less CPU per call than the Python servers it measures.
//
//   node bench/loadgen.mjs '{"url": "ws://127.0.0.1:3100", "mode": "add", ...}'
//
// mode "add": `sockets` sockets each keep `window` addMessage calls in flight for `seconds`,
// spread over `connections` connection ids (prefix `run`). mode "drain": takeFromQueue(limit 10)
// + removeMessages until every connection is empty. Prints one JSON line.
import { createRequire } from 'node:module'
import { fileURLToPath } from 'node:url'
import path from 'node:path'

const here = path.dirname(fileURLToPath(import.meta.url))
const require = createRequire(path.join(here, '..', 'tests', 'interop', 'package.json'))
const WebSocket = require('ws')

const opts = Object.assign(
  { url: 'ws://127.0.0.1:3100', mode: 'add', sockets: 32, window: 4, seconds: 10, connections: 1000, payload: 1024, run: 'bench' },
  JSON.parse(process.argv[2] || '{}'),
)

function percentile (values, p) {
  if (values.length === 0) return 0
  const sorted = Float64Array.from(values).sort()
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))]
}

function open (i) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`${opts.url}/?socket_id=${opts.run}-${i}`, { perMessageDeflate: false })
    const pending = new Map()
    let next = 1
    ws.on('open', () => {
      ws._socket.setNoDelay(true)
      resolve({
        call (method, params) {
          const id = next++
          ws.send(JSON.stringify({ jsonrpc: '2.0', method, params, id }))
          return new Promise((resolve, reject) => pending.set(id, { resolve, reject }))
        },
        close () { ws.close(1000) },
      })
    })
    ws.on('error', reject)
    ws.on('message', (data) => {
      const reply = JSON.parse(data)
      const waiter = pending.get(reply.id)
      if (waiter === undefined) return // a notification
      pending.delete(reply.id)
      if (reply.error) waiter.reject(new Error(JSON.stringify(reply.error)))
      else waiter.resolve(reply.result)
    })
  })
}

const connections = Array.from({ length: opts.connections }, (_, i) => `${opts.run}-${i}`)
const clients = await Promise.all(Array.from({ length: opts.sockets }, (_, i) => open(i)))
const latencies = []
let errors = 0
const started = process.hrtime.bigint()
const seconds = () => Number(process.hrtime.bigint() - started) / 1e9

if (opts.mode === 'add') {
  const payload = { protected: 'eyJ' + 'a'.repeat(40), iv: 'b'.repeat(16), ciphertext: 'c'.repeat(opts.payload), tag: 'd'.repeat(22) }
  let calls = 0
  async function worker (client, n) {
    let i = 0
    while (seconds() < opts.seconds) {
      const connectionId = connections[(n + i++) % connections.length]
      const t0 = process.hrtime.bigint()
      try {
        await client.call('addMessage', { connectionId, recipientDids: ['did:key:z6Mk'], payload })
        latencies.push(Number(process.hrtime.bigint() - t0) / 1e6)
        calls++
      } catch { errors++ }
    }
  }
  await Promise.all(clients.flatMap((c, i) => Array.from({ length: opts.window }, (_, w) => worker(c, i * opts.window + w))))
  const elapsed = seconds()
  console.log(JSON.stringify({ phase: 'add', calls, errors, seconds: elapsed, per_second: calls / elapsed, p50_ms: percentile(latencies, 0.5), p99_ms: percentile(latencies, 0.99) }))
} else {
  let drained = 0
  async function worker (client, connectionId) {
    for (;;) {
      const t0 = process.hrtime.bigint()
      const messages = await client.call('takeFromQueue', { connectionId, limit: 10 })
      if (messages.length === 0) return
      await client.call('removeMessages', { connectionId, messageIds: messages.map(m => m.id) })
      latencies.push(Number(process.hrtime.bigint() - t0) / 1e6)
      drained += messages.length
    }
  }
  const queue = [...connections]
  await Promise.all(clients.flatMap((c) => Array.from({ length: opts.window }, async () => {
    for (let cid = queue.shift(); cid !== undefined; cid = queue.shift()) await worker(c, cid)
  })))
  const elapsed = seconds()
  console.log(JSON.stringify({ phase: 'drain', messages: drained, seconds: elapsed, per_second: drained / elapsed, p50_ms: percentile(latencies, 0.5), p99_ms: percentile(latencies, 0.99) }))
}
for (const c of clients) c.close()
process.exit(0)
