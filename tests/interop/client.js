// Drives mpr-server through the real rpc-websockets 7.11.2 client exactly as the official
// @2060.io/message-pickup-repository-client 0.0.8 does (same Client options, same 2 s call
// timeout, same result type checks), and reconnects across a server restart.
//
// Usage: node client.js ws://127.0.0.1:PORT
// Output: one JSON object per line on stdout:
//   {"step": name, "ok": true, "result": ...} | {"step": name, "ok": false, "error": "..."}
//   {"event": "READY_FOR_RESTART"}  -> the driver restarts the server, then writes "RESTARTED\n" on stdin
//   {"done": true, "ok": <every step ok>}
// Exit status 0 only when every step passed.
'use strict'

const { Client } = require('rpc-websockets')

const url = process.argv[2]
if (!url) {
  console.error('usage: node client.js ws://host:port')
  process.exit(64)
}

const CLIENT_OPTIONS = { reconnect: true, reconnect_interval: 1000, max_reconnects: 4 }
const CALL_TIMEOUT = 2000
const OVERALL_TIMEOUT = 30000
const DID = 'did:key:z6MkInteropRecipient'

let allOk = true

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n')
}

function fail(message) {
  allOk = false
  emit({ done: true, ok: false, error: message })
  process.exit(1)
}

const overall = setTimeout(() => fail(`overall timeout of ${OVERALL_TIMEOUT} ms`), OVERALL_TIMEOUT)

// The driver keeps stdin open for the whole run; if it goes away, so do we.
let stdinBuffer = ''
const stdinWaiters = []
process.stdin.setEncoding('utf8')
process.stdin.on('data', (chunk) => {
  stdinBuffer += chunk
  let newline
  while ((newline = stdinBuffer.indexOf('\n')) >= 0) {
    const line = stdinBuffer.slice(0, newline).trim()
    stdinBuffer = stdinBuffer.slice(newline + 1)
    const waiter = stdinWaiters.shift()
    if (waiter) waiter(line)
  }
})
process.stdin.on('end', () => fail('stdin closed by the driver'))

function nextStdinLine() {
  return new Promise((resolve) => stdinWaiters.push(resolve))
}

function withTimeout(promise, ms, what) {
  let timer
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timeout after ${ms} ms waiting for ${what}`)), ms)
    }),
  ]).finally(() => clearTimeout(timer))
}

function once(client, event, what, ms = 5000) {
  return withTimeout(new Promise((resolve) => client.once(event, (...args) => resolve(args))), ms, what)
}

function describe(error) {
  if (error instanceof Error) return error.message
  return JSON.stringify(error) // a JSON-RPC error object
}

// Run one step; `check` throws (like the official client does) when the result has the wrong type.
async function step(name, fn, check) {
  try {
    const result = await fn()
    if (check) check(result)
    emit({ step: name, ok: true, result: result === undefined ? null : result })
    return result
  } catch (error) {
    allOk = false
    emit({ step: name, ok: false, error: describe(error) })
    return undefined
  }
}

// The official client's result checks (MessagePickupRepositoryClient 0.0.8).
const isArray = (r) => {
  if (!Array.isArray(r)) throw new Error('Unexpected result: Expected an array of QueuedMessage objects')
}
const isNumber = (r) => {
  if (typeof r !== 'number') throw new Error('The result is not a number')
}
const isObjectOrNull = (r) => {
  if (!(r === null || typeof r === 'object')) throw new Error('Unexpected result: Expected an object or null')
}
const isBoolean = (r) => {
  if (typeof r !== 'boolean') throw new Error('Unexpected result: Expected a boolean value')
}
const isPong = (r) => {
  if (r !== 'pong') throw new Error(`ping answered ${JSON.stringify(r)}`)
}
const isSubscribed = (r) => {
  if (!r || r.messagesReceived !== 'ok') throw new Error(`rpc.on answered ${JSON.stringify(r)}`)
}

async function connect(query) {
  const client = new Client(url + query, CLIENT_OPTIONS)
  await once(client, 'open', `open of ${query || '/'}`)
  return client
}

function payload(tag) {
  // Keys deliberately out of sorted order: the server must return them as sent.
  return {
    protected: 'eyJlbmMiOiJYQzIwUCJ9',
    recipients: [{ header: { kid: DID + '#key-1' }, encrypted_key: 'ek-' + tag }],
    iv: 'iv-' + tag,
    ciphertext: 'ct-' + tag,
    tag: 'tag-' + tag,
  }
}

async function main() {
  const mediator = await connect('?socket_id=interop-mediator')
  const received = []
  const receivedWaiters = []
  mediator.addListener('messagesReceived', (data) => {
    received.push(data)
    const waiter = receivedWaiters.shift()
    if (waiter) waiter(data)
  })
  const nextReceived = (what) =>
    withTimeout(
      new Promise((resolve) => (received.length ? resolve(received.shift()) : receivedWaiters.push(() => resolve(received.shift())))),
      5000,
      what,
    )

  await step('subscribe', () => mediator.subscribe('messagesReceived'), isSubscribed)
  const other = await connect('')

  await step('addLiveSession', () => mediator.call('addLiveSession', { connectionId: 'live', sessionId: 's1' }, CALL_TIMEOUT), isBoolean)
  await step('getLiveSession', () => mediator.call('getLiveSession', { connectionId: 'live' }, CALL_TIMEOUT), isBoolean)

  const livePayload = payload('live')
  const added = await step(
    'addMessage-live',
    () =>
      other.call(
        'addMessage',
        { connectionId: 'live', recipientDids: [DID], payload: livePayload, pushNotificationToken: { type: 'fcm', token: 'x' } },
        CALL_TIMEOUT,
      ),
    isObjectOrNull,
  )
  await step('messagesReceived', async () => {
    const data = await nextReceived('messagesReceived')
    const messages = data && data.messages
    if (!Array.isArray(messages) || messages.length !== 1) throw new Error(`bad event ${JSON.stringify(data)}`)
    if (added && messages[0].id !== added.messageId) throw new Error('event id differs from the messageId')
    if (JSON.stringify(messages[0].encryptedMessage) !== JSON.stringify(livePayload))
      throw new Error('encryptedMessage differs (values or key order)')
    return data
  })
  await step(
    'removeMessages',
    () => mediator.call('removeMessages', { connectionId: 'live', messageIds: added ? [added.messageId] : [] }, CALL_TIMEOUT),
    isBoolean,
  )

  // A connection without a live session; the official client sets `token` from its callback
  // (undefined without one, so JSON omits it).
  await step(
    'addMessage-queued',
    () => other.call('addMessage', { connectionId: 'queue', recipientDids: [DID], payload: payload('q1'), token: undefined }, CALL_TIMEOUT),
    isObjectOrNull,
  )
  await step(
    'addMessage-legacy-token',
    () => other.call('addMessage', { connectionId: 'queue', recipientDids: [DID], payload: payload('q2'), token: 'legacy' }, CALL_TIMEOUT),
    isObjectOrNull,
  )
  await step('getAvailableMessageCount', () => other.call('getAvailableMessageCount', { connectionId: 'queue' }, CALL_TIMEOUT), isNumber)
  await step('takeFromQueue', () => other.call('takeFromQueue', { connectionId: 'queue', limit: 1 }, CALL_TIMEOUT), isArray)
  await step(
    'takeFromQueue-recipient',
    () => other.call('takeFromQueue', { connectionId: 'queue', recipientDid: DID, limitBytes: 100000 }, CALL_TIMEOUT),
    isArray,
  )
  await step('removeAllMessages', () => other.call('removeAllMessages', { connectionId: 'queue', recipientDid: DID }, CALL_TIMEOUT), isBoolean)
  await step('getAvailableMessageCount-after-removeAll', () => other.call('getAvailableMessageCount', { connectionId: 'queue' }, CALL_TIMEOUT), isNumber)
  await step('removeLiveSession', () => mediator.call('removeLiveSession', { connectionId: 'live' }, CALL_TIMEOUT), isBoolean)
  await step('getLiveSession-after-remove', () => mediator.call('getLiveSession', { connectionId: 'live' }, CALL_TIMEOUT), isBoolean)
  await step('ping', () => mediator.call('ping'), isPong)
  await step(
    'addMessage-persist',
    () => other.call('addMessage', { connectionId: 'persist', recipientDids: [DID], payload: payload('p') }, CALL_TIMEOUT),
    isObjectOrNull,
  )

  // -- the server restarts: both clients must come back by themselves -------------------------
  const closed = once(mediator, 'close', 'close of the mediator socket', 15000)
  const reopened = closed.then(() => once(mediator, 'open', 'reconnect of the mediator socket', 15000))
  const otherReopened = once(other, 'close', 'close of the second socket', 15000).then(() =>
    once(other, 'open', 'reconnect of the second socket', 15000),
  )
  emit({ event: 'READY_FOR_RESTART' })
  const line = await withTimeout(nextStdinLine(), 20000, 'RESTARTED from the driver')
  if (line !== 'RESTARTED') fail(`unexpected driver line ${JSON.stringify(line)}`)

  await step('close', async () => {
    const [code] = await closed
    return { code }
  })
  await step('reconnected', async () => {
    await reopened
    await otherReopened
    return true
  })
  // What the official client does on every 'open'.
  await step('subscribe-after-restart', () => mediator.subscribe('messagesReceived'), isSubscribed)
  await step('ping-after-restart', () => mediator.call('ping'), isPong)
  await step(
    'getAvailableMessageCount-after-restart',
    () => other.call('getAvailableMessageCount', { connectionId: 'persist' }, CALL_TIMEOUT),
    isNumber,
  )
  await step('addLiveSession-after-restart', () => mediator.call('addLiveSession', { connectionId: 'live2', sessionId: 's2' }, CALL_TIMEOUT), isBoolean)
  const again = await step(
    'addMessage-after-restart',
    () => other.call('addMessage', { connectionId: 'live2', recipientDids: [DID], payload: payload('again') }, CALL_TIMEOUT),
    isObjectOrNull,
  )
  await step('messagesReceived-after-restart', async () => {
    const data = await nextReceived('messagesReceived after the restart')
    if (!again || data.connectionId !== 'live2' || data.messages[0].id !== again.messageId)
      throw new Error(`bad event ${JSON.stringify(data)}`)
    return data
  })

  clearTimeout(overall)
  mediator.close()
  other.close()
  emit({ done: true, ok: allOk })
  process.exit(allOk ? 0 : 1)
}

main().catch((error) => fail(`crashed: ${error && error.stack ? error.stack : describe(error)}`))
