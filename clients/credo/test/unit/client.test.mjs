// MprQueueTransportRepository against a running mpr-server (started by tests/credo, which
// passes MPR_URL and MPR_CONTROL_URL to stop/start/restart it on the same port).
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import test from 'node:test'

import { askar } from '@openwallet-foundation/askar-nodejs'
import { DidCommMessagePickupSessionRole, DidCommMessagePickupSessionService } from '@credo-ts/didcomm'

import {
  MprNotConnectedError,
  MprQueueTransportRepository,
  MprRpcError,
} from '../../build/index.js'
import { makeAgent } from '../agents/credo.mjs'
import { controlMpr, env, eventually, MprProbe, RecordingRelay } from '../harness.mjs'

const MPR_URL = env('MPR_URL')
const ctx = {} // the repository does not use the agent context (only the push hook sees it)
const DID = 'did:key:z6MkpTHR8VNsBxYAAWHut2Geadd9jSwuBV8xRoAnwWsdvktH'
const OTHER_DID = 'did:key:z6MkjchhfUsD6mmvni8mCdXHw216Xrm9bQe2mBH1P5RDjVJG'

function jwe(tag) {
  // deliberately unsorted keys: the payload must come back byte-for-byte
  return { protected: 'eyJlbmMiOiJYQzIwUCJ9', recipients: [{ header: { kid: `${DID}#1` }, encrypted_key: `ek-${tag}` }], iv: `iv-${tag}`, ciphertext: `ct-${tag}`, tag: 'tg' }
}

function memoryLogger() {
  const lines = []
  const log = (level) => (message, data) => lines.push({ level, message, data })
  return { lines, debug: log('debug'), info: log('info'), warn: log('warn'), error: log('error') }
}

function repository(options = {}) {
  return new MprQueueTransportRepository({ url: MPR_URL, reconnect: { initialDelayMs: 50, maxDelayMs: 300 }, ...options })
}

test('the four queue operations map to MPR over the wire', async (t) => {
  const relay = await new RecordingRelay(MPR_URL).listen()
  const repo = repository({ url: relay.url })
  t.after(async () => {
    await repo.close()
    await relay.close()
  })
  await repo.connect()
  const connectionId = `c-${randomUUID()}`
  const ids = []
  for (const tag of ['a', 'b', 'c']) {
    ids.push(await repo.addMessage(ctx, { connectionId, recipientDids: [DID], payload: jwe(tag) }))
  }
  const other = await repo.addMessage(ctx, { connectionId, recipientDids: [OTHER_DID], payload: jwe('d'), receivedAt: new Date(0) })
  for (const id of [...ids, other]) assert.match(id, /^[0-9a-f]{24}$/)

  assert.equal(await repo.getAvailableMessageCount(ctx, { connectionId }), 4)
  assert.equal(await repo.getAvailableMessageCount(ctx, { connectionId, recipientDid: OTHER_DID }), 1)

  assert.deepEqual(await repo.takeFromQueue(ctx, { connectionId, limit: 0 }), [], 'limit 0: no message')
  const two = await repo.takeFromQueue(ctx, { connectionId, recipientDid: DID, limit: 2 })
  assert.deepEqual(two.map((m) => m.id), ids.slice(0, 2), 'oldest first, exact limit')
  for (const m of two) {
    assert.ok(m.receivedAt instanceof Date && !Number.isNaN(m.receivedAt.getTime()), 'receivedAt is a Date')
    assert.ok(Math.abs(m.receivedAt.getTime() - Date.now()) < 60000, 'stamped by MPR at add time')
  }
  assert.equal(JSON.stringify(two[0].encryptedMessage), JSON.stringify(jwe('a')), 'payload untouched, key order too')

  const rest = await repo.takeFromQueue(ctx, { connectionId })
  assert.deepEqual(rest.map((m) => m.id), [ids[2], other], 'no limit: all the remaining messages')
  assert.equal(await repo.getAvailableMessageCount(ctx, { connectionId }), 0, 'taken messages are leased')

  await repo.removeMessages(ctx, { connectionId, messageIds: [...ids, other] })
  await repo.removeMessages(ctx, { connectionId, messageIds: [] })

  // what went on the wire
  const takes = relay.calls('takeFromQueue').map((f) => f.params)
  assert.deepEqual(takes, [
    { connectionId, recipientDid: DID, limit: 2 },
    { connectionId },
  ])
  assert.deepEqual(relay.calls('addMessage')[3].params, { connectionId, recipientDids: [OTHER_DID], payload: jwe('d') })
  assert.equal(relay.calls('removeMessages').length, 1, 'an empty removal sends nothing')

  // deleteMessages (Pickup v1) passes through: the messages are gone, not leased
  const gone = await repo.addMessage(ctx, { connectionId, recipientDids: [DID], payload: jwe('e') })
  assert.deepEqual((await repo.takeFromQueue(ctx, { connectionId, deleteMessages: true })).map((m) => m.id), [gone])
  const probe = await MprProbe.open(MPR_URL)
  t.after(() => probe.close())
  assert.deepEqual(await probe.call('takeFromQueue', { connectionId }), [])
})

test('the push hook puts the device token on addMessage, and its failure loses no message', async (t) => {
  const relay = await new RecordingRelay(MPR_URL).listen()
  const seen = []
  let fail = false
  const logger = memoryLogger()
  const repo = repository({
    url: relay.url,
    logger,
    pushToken: async (agentContext, connectionId) => {
      seen.push([agentContext, connectionId])
      if (fail) throw new Error('token store down')
      return connectionId.endsWith('-push') ? { type: 'fcm', token: 'device-token-1' } : undefined
    },
  })
  t.after(async () => {
    await repo.close()
    await relay.close()
  })
  await repo.connect()
  const base = `c-${randomUUID()}`
  await repo.addMessage(ctx, { connectionId: `${base}-push`, recipientDids: [DID], payload: jwe('p') })
  await repo.addMessage(ctx, { connectionId: `${base}-none`, recipientDids: [DID], payload: jwe('q') })
  fail = true
  await repo.addMessage(ctx, { connectionId: `${base}-push`, recipientDids: [DID], payload: jwe('r') })
  const adds = relay.calls('addMessage').map((f) => f.params)
  assert.deepEqual(adds[0].pushNotificationToken, { type: 'fcm', token: 'device-token-1' })
  assert.ok(!('pushNotificationToken' in adds[1]))
  assert.ok(!('pushNotificationToken' in adds[2]))
  assert.deepEqual(seen.map(([c, id]) => [c === ctx, id]), [[true, `${base}-push`], [true, `${base}-none`], [true, `${base}-push`]])
  assert.equal(await repo.getAvailableMessageCount(ctx, { connectionId: `${base}-push` }), 2)
  assert.ok(logger.lines.some((l) => l.level === 'warn' && l.message.includes('pushToken hook failed')))
})

test('MPR errors become MprRpcError; socket_id and token go to the handshake', async (t) => {
  const relay = await new RecordingRelay(MPR_URL).listen()
  const repo = repository({ url: relay.url, socketId: 'mediator-a', token: 's3cret' })
  t.after(async () => {
    await repo.close()
    await relay.close()
  })
  await repo.connect()
  assert.equal(relay.handshakes[0].url, '/?socket_id=mediator-a')
  assert.equal(relay.handshakes[0].authorization, 'Bearer s3cret')
  await assert.rejects(
    repo.addMessage(ctx, { connectionId: 'c', recipientDids: 'not-a-list', payload: jwe('x') }),
    (error) => {
      assert.ok(error instanceof MprRpcError, String(error))
      assert.equal(error.method, 'addMessage')
      assert.equal(error.code, -32602)
      assert.match(error.message, /recipientDids/)
      return true
    }
  )
  await assert.rejects(repo.takeFromQueue(ctx, { connectionId: '', limit: 1 }), MprRpcError)
  await assert.rejects(repo.getAvailableMessageCount(ctx, { connectionId: 7 }), MprRpcError)
})

test('an unreachable MPR: calls fail fast with a clear error', async (t) => {
  const repo = new MprQueueTransportRepository({ url: 'ws://127.0.0.1:9/', reconnect: { initialDelayMs: 20, maxDelayMs: 50 } })
  t.after(() => repo.close())
  const started = Date.now()
  await assert.rejects(repo.getAvailableMessageCount(ctx, { connectionId: 'c' }), (error) => {
    assert.ok(error instanceof MprNotConnectedError)
    assert.match(error.message, /not connected to MPR at ws:\/\/127\.0\.0\.1:9\//)
    return true
  })
  assert.ok(Date.now() - started < 100, 'without waiting for a timeout')
  await assert.rejects(repo.connect(300), MprNotConnectedError)
  assert.throws(() => new MprQueueTransportRepository({ url: 'http://x' }), /ws:\/\/ or wss:\/\//)
})

test('reconnects after MPR restarts, re-registers live sessions, and notifies once', { timeout: 60000 }, async (t) => {
  const agent = makeAgent({
    label: 'unit-mediator',
    storeId: `unit-${randomUUID()}`,
    storeKey: askar.storeGenerateRawKey({}),
    didcomm: { mediator: true },
  })
  await agent.initialize()
  const logger = memoryLogger()
  const repo = repository({ logger, socketId: `unit-${randomUUID()}` })
  let probe = await MprProbe.open(MPR_URL)
  t.after(async () => {
    await repo.close()
    probe.close()
    await agent.shutdown()
  })
  await repo.attach(agent)
  assert.equal(repo.connectionCount, 1)

  const connectionId = `c-${randomUUID()}`
  const sessions = agent.dependencyManager.resolve(DidCommMessagePickupSessionService)
  sessions.saveLiveSession(agent.context, {
    connectionId,
    protocolVersion: 'v2',
    role: DidCommMessagePickupSessionRole.MessageHolder,
    transportSessionId: 'transport-1',
  })
  // a session the agent holds as a recipient is not the mediator's business
  sessions.saveLiveSession(agent.context, {
    connectionId: `${connectionId}-recipient`,
    protocolVersion: 'v2',
    role: DidCommMessagePickupSessionRole.Recipient,
    transportSessionId: 'transport-2',
  })
  const isLive = (id) => probe.call('getLiveSession', { connectionId: id })
  await eventually(() => isLive(connectionId), (v) => v === true, 5000, 'registered')
  assert.equal(await isLive(`${connectionId}-recipient`), false)

  for (let restart = 1; restart <= 2; restart++) {
    probe.close()
    await controlMpr('restart')
    await eventually(() => Promise.resolve(repo.connectionCount), (n) => n === restart + 1, 15000, 'reconnected')
    probe = await MprProbe.open(MPR_URL)
    await eventually(() => isLive(connectionId), (v) => v === true, 5000, `re-registered after restart ${restart}`)
  }

  // one notification after two reconnects is handled once (no listener piles up)
  const id = await repo.addMessage(agent.context, { connectionId, recipientDids: [DID], payload: jwe('n') })
  const handled = () => logger.lines.filter((l) => JSON.stringify(l.data ?? {}).includes(connectionId) && /Deliver/.test(l.message))
  await eventually(() => Promise.resolve(handled().length), (n) => n >= 1, 5000, 'the notification handled')
  // the delivery itself fails (no DIDComm connection behind this test session): not acknowledged,
  // so the message stays leased in MPR, neither pending nor lost
  await repo.addMessage(agent.context, { connectionId: `${connectionId}-marker`, recipientDids: [DID], payload: jwe('m') })
  assert.equal(handled().length, 1, JSON.stringify(handled()))
  assert.equal(await probe.count(connectionId), 0)
  assert.ok(id)

  // while MPR is down: calls fail at once; the session comes back with MPR
  await controlMpr('stop')
  await eventually(() => Promise.resolve(repo.connected), (c) => c === false, 5000, 'disconnected')
  const started = Date.now()
  await assert.rejects(repo.getAvailableMessageCount(ctx, { connectionId }), MprNotConnectedError)
  assert.ok(Date.now() - started < 100)
  await controlMpr('start')
  await repo.connect(15000)
  probe = await MprProbe.open(MPR_URL)
  await eventually(() => isLive(connectionId), (v) => v === true, 5000, 're-registered after the outage')

  // the session ends in Credo: it ends in MPR too
  sessions.removeLiveSession(agent.context, { connectionId })
  await eventually(() => isLive(connectionId), (v) => v === false, 5000, 'removed')
  assert.deepEqual(repo.liveSessionConnectionIds, [])
})
