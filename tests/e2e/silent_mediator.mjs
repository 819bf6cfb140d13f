// A mediator process for tests/e2e/test_faults.py: it opens the live sessions of the connections
// given, says "ready", then only receives (ws answers the server's pings by itself). The test
// stops it with SIGSTOP: its socket then goes silent without a close, as when a host vanishes.
//   node tests/e2e/silent_mediator.mjs ws://127.0.0.1:PORT connection-1 connection-2 ...
import { createRequire } from 'node:module'
import { fileURLToPath } from 'node:url'
import path from 'node:path'

const here = path.dirname(fileURLToPath(import.meta.url))
const require = createRequire(path.join(here, '..', 'interop', 'package.json'))
const WebSocket = require('ws')

const [url, ...connections] = process.argv.slice(2)
const ws = new WebSocket(url, { perMessageDeflate: false })
let next = 1
const pending = new Map()
const call = (method, params) => new Promise((resolve, reject) => {
  const id = next++
  pending.set(id, { resolve, reject })
  ws.send(JSON.stringify({ jsonrpc: '2.0', method, params, id }))
})
ws.on('message', (data) => {
  const reply = JSON.parse(data)
  const waiter = pending.get(reply.id)
  if (waiter === undefined) return // a notification: received, never acknowledged
  pending.delete(reply.id)
  if (reply.error) waiter.reject(new Error(JSON.stringify(reply.error)))
  else waiter.resolve(reply.result)
})
ws.on('open', async () => {
  for (const connectionId of connections) {
    if ((await call('addLiveSession', { connectionId, sessionId: 's' })) !== true) process.exit(2)
  }
  console.log('ready')
})
ws.on('close', (code) => { console.log(`closed ${code}`); process.exit(0) })
ws.on('error', (e) => { console.error(String(e)); process.exit(1) })
