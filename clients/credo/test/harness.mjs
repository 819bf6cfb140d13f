// Test helpers: free ports, event waits with timeouts (no sleeps), a raw JSON-RPC probe of MPR
// (independent of the package), a TCP load balancer and mediator child processes.
import { spawn } from 'node:child_process'
import net from 'node:net'
import path from 'node:path'
import readline from 'node:readline'
import { fileURLToPath } from 'node:url'

import WebSocket, { WebSocketServer } from 'ws'

const HERE = path.dirname(fileURLToPath(import.meta.url))

export function env(name) {
  const value = process.env[name]
  if (!value) throw new Error(`${name} is not set (the pytest harness in tests/credo sets it)`)
  return value
}

export async function freePort() {
  const server = net.createServer()
  await new Promise((resolve, reject) => server.listen(0, '127.0.0.1', resolve).on('error', reject))
  const { port } = server.address()
  await new Promise((resolve) => server.close(resolve))
  return port
}

/** Resolves with `promise`'s value, or rejects after `ms` with a message naming `what`. */
export function withTimeout(promise, ms, what) {
  let timer
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms)
  })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}

/** Ask `probe` every 100 ms until `accept(value)`; fail after `ms` (for state in another process). */
export async function eventually(probe, accept, ms, what) {
  const deadline = Date.now() + ms
  for (;;) {
    const value = await probe()
    if (accept(value)) return value
    if (Date.now() > deadline) throw new Error(`${what}: still ${JSON.stringify(value)} after ${ms} ms`)
    await new Promise((resolve) => setTimeout(resolve, 100))
  }
}

/** A minimal JSON-RPC client of MPR, for checking its state from the outside. */
export class MprProbe {
  static async open(url) {
    const ws = new WebSocket(url)
    await withTimeout(new Promise((resolve, reject) => ws.once('open', resolve).once('error', reject)), 5000, `MPR at ${url}`)
    return new MprProbe(ws)
  }

  constructor(ws) {
    this.ws = ws
    this.nextId = 1
    this.pending = new Map()
    this.notifications = []
    this.waiters = []
    ws.on('message', (data) => {
      const frame = JSON.parse(data.toString())
      if (frame.id && this.pending.has(frame.id)) {
        this.pending.get(frame.id)(frame)
        this.pending.delete(frame.id)
      } else if (frame.method) {
        this.notifications.push(frame)
        for (const waiter of this.waiters.splice(0)) waiter()
      }
    })
  }

  async call(method, params) {
    const id = this.nextId++
    const reply = new Promise((resolve) => this.pending.set(id, resolve))
    this.ws.send(JSON.stringify({ jsonrpc: '2.0', method, params, id }))
    const frame = await withTimeout(reply, 5000, `MPR ${method}`)
    if (frame.error) throw new Error(`MPR ${method}: ${JSON.stringify(frame.error)}`)
    return frame.result
  }

  count(connectionId) {
    return this.call('getAvailableMessageCount', { connectionId })
  }

  close() {
    this.ws.terminate()
  }
}

/** Reads a child's stdout as JSON lines; `waitFor(predicate)` resolves with the first matching line. */
class LineReader {
  constructor(stream, name) {
    this.name = name
    this.lines = []
    this.waiters = []
    readline.createInterface({ input: stream }).on('line', (text) => {
      let line
      try {
        line = JSON.parse(text)
      } catch {
        line = { event: 'text', text }
      }
      this.lines.push(line)
      for (const waiter of [...this.waiters]) waiter.check(line)
    })
  }

  /** The first line from index `from` on that matches. */
  waitFor(predicate, ms, what, from = 0) {
    const found = this.lines.slice(from).find(predicate)
    if (found) return Promise.resolve(found)
    let waiter
    const promise = new Promise((resolve) => {
      waiter = {
        check: (line) => {
          if (predicate(line)) {
            this.waiters.splice(this.waiters.indexOf(waiter), 1)
            resolve(line)
          }
        },
      }
      this.waiters.push(waiter)
    })
    return withTimeout(promise, ms, `${this.name}: ${what}`).catch((error) => {
      this.waiters.splice(this.waiters.indexOf(waiter), 1)
      throw error
    })
  }
}

/** A mediator (test/agents/mediator.mjs) as a child process that can be stopped and started again. */
export class MediatorProcess {
  constructor(name, environment) {
    this.name = name
    this.environment = environment
    this.child = undefined
    this.stderr = ''
    this.runs = 0
  }

  get reader() {
    return this.out
  }

  async start(ms = 30000) {
    this.runs += 1
    const child = spawn(process.execPath, [path.join(HERE, 'agents', 'mediator.mjs')], {
      env: { ...process.env, ...this.environment },
      stdio: ['ignore', 'pipe', 'pipe'],
    })
    this.child = child
    this.exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })))
    child.stderr.on('data', (data) => {
      this.stderr += data.toString()
    })
    this.out = new LineReader(child.stdout, `${this.name} (run ${this.runs})`)
    const ready = this.out.waitFor((l) => l.event === 'ready', ms, 'ready')
    const ended = this.exited.then((e) => {
      throw new Error(`${this.name} exited ${JSON.stringify(e)} before ready:\n${this.stderr}`)
    })
    return await Promise.race([ready, ended])
  }

  waitFor(predicate, ms, what) {
    return this.out.waitFor(predicate, ms, what)
  }

  /** SIGTERM and wait for the exit (SIGKILL if it takes more than `ms`). */
  async stop(ms = 10000) {
    if (!this.child || this.child.exitCode !== null || this.child.signalCode !== null) return
    this.child.kill('SIGTERM')
    try {
      return await withTimeout(this.exited, ms, `${this.name} to exit`)
    } catch (error) {
      this.child.kill('SIGKILL')
      await this.exited
      throw error
    }
  }

  kill() {
    if (this.child && this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGKILL')
  }
}

/**
 * A TCP load balancer in front of the mediator instances: new connections go to the current
 * target; open ones stay where they are until dropped (as when a balancer fails a node over).
 */
export class LoadBalancer {
  constructor(backends) {
    this.backends = backends // name -> port
    this.target = Object.keys(backends)[0]
    this.pairs = new Set()
    this.accepted = {}
    this.server = net.createServer((client) => this.accept(client))
  }

  async listen() {
    await new Promise((resolve, reject) => this.server.listen(0, '127.0.0.1', resolve).on('error', reject))
    this.port = this.server.address().port
    return this
  }

  accept(client) {
    const name = this.target
    this.accepted[name] = (this.accepted[name] ?? 0) + 1
    const upstream = net.connect(this.backends[name], '127.0.0.1')
    const pair = { name, client, upstream }
    this.pairs.add(pair)
    const drop = () => {
      this.pairs.delete(pair)
      client.destroy()
      upstream.destroy()
    }
    client.on('error', drop).on('close', drop)
    upstream.on('error', drop).on('close', drop)
    client.pipe(upstream)
    upstream.pipe(client)
  }

  route(name) {
    this.target = name
  }

  /** Cut every open connection to backend `name`; returns how many were cut. */
  drop(name) {
    let n = 0
    for (const pair of [...this.pairs]) {
      if (pair.name === name) {
        pair.client.destroy()
        pair.upstream.destroy()
        this.pairs.delete(pair)
        n += 1
      }
    }
    return n
  }

  async close() {
    for (const pair of this.pairs) {
      pair.client.destroy()
      pair.upstream.destroy()
    }
    await new Promise((resolve) => this.server.close(resolve))
  }
}

/**
 * A WebSocket relay in front of the real MPR that records every frame a client sends (to check
 * what goes on the wire) and the handshake it made; answers come from MPR unchanged.
 */
export class RecordingRelay {
  constructor(targetUrl) {
    this.target = new URL(targetUrl)
    this.sent = []
    this.handshakes = []
    this.server = new WebSocketServer({ host: '127.0.0.1', port: 0 })
    this.server.on('connection', (client, request) => {
      this.handshakes.push({ url: request.url, authorization: request.headers.authorization })
      const upstream = new WebSocket(new URL(request.url, this.target))
      const queue = []
      upstream.on('open', () => queue.splice(0).forEach((frame) => upstream.send(frame)))
      client.on('message', (data) => {
        const text = data.toString()
        this.sent.push(JSON.parse(text))
        if (upstream.readyState === WebSocket.OPEN) upstream.send(text)
        else queue.push(text)
      })
      upstream.on('message', (data) => client.send(data.toString()))
      const end = () => {
        client.terminate()
        upstream.terminate()
      }
      client.on('close', end).on('error', end)
      upstream.on('close', end).on('error', end)
    })
  }

  async listen() {
    await new Promise((resolve) => this.server.once('listening', resolve))
    this.url = `ws://127.0.0.1:${this.server.address().port}`
    return this
  }

  calls(method) {
    return this.sent.filter((frame) => frame.method === method)
  }

  async close() {
    for (const client of this.server.clients) client.terminate()
    await new Promise((resolve) => this.server.close(resolve))
  }
}

/** Ask the pytest harness to stop, start or restart the MPR server (same port and data). */
export async function controlMpr(action) {
  const response = await withTimeout(fetch(`${env('MPR_CONTROL_URL')}/${action}`, { method: 'POST' }), 30000, `MPR ${action}`)
  if (!response.ok) throw new Error(`MPR ${action}: HTTP ${response.status} ${await response.text()}`)
}
