// Real Credo 0.6 agents through two mediator instances sharing mpr-server (started by the pytest
// harness, tests/credo, which passes MPR_URL and, for a second MPR instance, MPR_URL_2):
//   1. a recipient connects to mediator 1 (behind a load balancer) and gets mediation;
//   2. it goes live (Pickup v2 live mode) on mediator 2;
//   3. a sender connects to it and sends messages, forwarded by mediator 1: they reach the
//      recipient through mediator 2's live session (MPR's cross-instance notification);
//   4. the recipient goes offline; more messages queue in MPR; mediator 1 restarts meanwhile;
//   5. the recipient returns and picks them up with Pickup v2 polling (through mediator 1).
// Every message must arrive exactly once, and MPR's queue must be empty at the end.
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import os from 'node:os'
import path from 'node:path'
import test from 'node:test'

import { askar } from '@openwallet-foundation/askar-nodejs'
import {
  DidCommBasicMessageEventTypes,
  DidCommBasicMessageRole,
  DidCommConnectionEventTypes,
  DidCommDidExchangeState,
  DidCommMediatorPickupStrategy,
} from '@credo-ts/didcomm'

import { loopbackWsInbound, makeAgent } from '../agents/credo.mjs'
import { env, eventually, freePort, LoadBalancer, MediatorProcess, MprProbe, withTimeout } from '../harness.mjs'

const STEP_MS = 20000

/** Resolves with the first event of `type` on `agent` that `accept`s, within `ms`. */
function nextEvent(agent, type, accept, ms, what) {
  let listener
  const promise = new Promise((resolve) => {
    listener = (event) => {
      if (accept(event)) resolve(event)
    }
    agent.events.on(type, listener)
  })
  return withTimeout(promise, ms, what).finally(() => agent.events.off(type, listener))
}

/** Counts the basic messages an agent receives; `waitFor(texts)` resolves once all arrived. */
function inbox(agent) {
  const counts = new Map()
  let wake = () => undefined
  agent.events.on(DidCommBasicMessageEventTypes.DidCommBasicMessageStateChanged, ({ payload }) => {
    if (payload.basicMessageRecord.role !== DidCommBasicMessageRole.Receiver) return
    const text = payload.message.content
    counts.set(text, (counts.get(text) ?? 0) + 1)
    wake()
  })
  return {
    counts,
    async waitFor(texts, ms, what) {
      const all = () => texts.every((t) => counts.has(t))
      if (all()) return
      await withTimeout(
        new Promise((resolve) => {
          wake = () => all() && resolve()
        }),
        ms,
        `${what} (missing: ${texts.filter((t) => !counts.has(t)).join(', ')})`
      )
    },
  }
}

function deliveredBy(mediator) {
  return mediator.reader.lines
    .filter((l) => l.event === 'mpr' && l.message.startsWith('Delivered '))
    .reduce((n, l) => n + l.data.messageIds.length, 0)
}

test('messages reach the recipient exactly once through two mediators and MPR', { timeout: 150000 }, async (t) => {
  const mprUrl1 = env('MPR_URL')
  const mprUrl2 = process.env.MPR_URL_2 || mprUrl1
  const dir = await mkdtemp(path.join(os.tmpdir(), 'mpr-credo-'))
  const [port1, port2, senderPort] = [await freePort(), await freePort(), await freePort()]
  const lb = await new LoadBalancer({ m1: port1, m2: port2 }).listen()
  const shared = {
    MEDIATOR_LABEL: 'mediator',
    MEDIATOR_ENDPOINT: `ws://127.0.0.1:${lb.port}`,
    STORE_ID: 'mediator',
    STORE_KEY: askar.storeGenerateRawKey({}),
    STORE_PATH: path.join(dir, 'mediator.sqlite'),
  }
  const m1 = new MediatorProcess('mediator-1', {
    ...shared,
    MEDIATOR_PORT: String(port1),
    MPR_URL: mprUrl1,
    MPR_SOCKET_ID: `mediator-1-${randomUUID()}`,
    CREATE_INVITATION: '1',
  })
  const m2 = new MediatorProcess('mediator-2', {
    ...shared,
    MEDIATOR_PORT: String(port2),
    MPR_URL: mprUrl2,
    MPR_SOCKET_ID: `mediator-2-${randomUUID()}`,
  })
  const agents = []
  let probe
  t.after(async () => {
    if (process.env.MPR_E2E_DEBUG) {
      for (const m of [m1, m2]) console.error(`--- ${m.name} ---\n${m.reader?.lines.map((l) => JSON.stringify(l)).join('\n')}\n${m.stderr}`)
    }
    for (const agent of agents) await agent.shutdown().catch(() => undefined)
    await Promise.allSettled([m1.stop(), m2.stop()])
    m1.kill()
    m2.kill()
    probe?.close()
    await lb.close()
    await rm(dir, { recursive: true, force: true })
  })
  const diagnostics = () =>
    `\n--- mediator-1 stderr ---\n${m1.stderr.slice(-3000)}\n--- mediator-2 stderr ---\n${m2.stderr.slice(-3000)}`

  const { invitationUrl } = await m1.start()
  await m2.start()

  const recipient = makeAgent({
    label: 'recipient',
    storeId: `recipient-${randomUUID()}`,
    storeKey: askar.storeGenerateRawKey({}),
    didcomm: {
      connections: { autoAcceptConnections: true },
      mediator: false,
      messagePickup: { maximumBatchSize: 3 },
      mediationRecipient: { mediatorPollingInterval: 250 },
    },
  })
  const sender = makeAgent({
    label: 'sender',
    storeId: `sender-${randomUUID()}`,
    storeKey: askar.storeGenerateRawKey({}),
    didcomm: {
      endpoints: [`ws://127.0.0.1:${senderPort}`],
      inbound: [loopbackWsInbound(senderPort)],
      connections: { autoAcceptConnections: true },
      mediator: false,
    },
  })
  agents.push(recipient, sender)
  await recipient.initialize()
  await sender.initialize()
  const received = inbox(recipient)

  // 1. the recipient connects to mediator 1 and gets mediation
  lb.route('m1')
  const onMediator = m1.waitFor(
    (l) => l.event === 'connection' && l.state === DidCommDidExchangeState.Completed,
    STEP_MS,
    'the mediator side of the connection completed'
  )
  const { connectionRecord } = await recipient.didcomm.oob.receiveInvitationFromUrl(invitationUrl, { label: 'recipient' })
  const mediatorConnection = await recipient.didcomm.connections.returnWhenIsConnected(connectionRecord.id, {
    timeoutMs: STEP_MS,
  })
  const mprConnectionId = (await onMediator).connectionId // the mediator's record id is MPR's connectionId
  const mediation = await recipient.didcomm.mediationRecipient.requestAndAwaitGrant(mediatorConnection, STEP_MS)
  await recipient.didcomm.mediationRecipient.setDefaultMediator(mediation)

  // 2. live mode on mediator 2: the balancer sends new connections there and cuts the old one
  lb.route('m2')
  lb.drop('m1')
  const registered = m2.waitFor(
    (l) => l.event === 'mpr' && l.message.startsWith('Live session registered') && l.data?.connectionId === mprConnectionId,
    STEP_MS,
    'the live session registered with MPR'
  )
  await recipient.didcomm.mediationRecipient.initiateMessagePickup(mediation, DidCommMediatorPickupStrategy.PickUpV2LiveMode)
  await registered
  probe = await MprProbe.open(mprUrl1)
  assert.equal(await probe.call('getLiveSession', { connectionId: mprConnectionId }), true)

  // 3. the sender connects to the recipient and sends; its forwards go to mediator 1
  lb.route('m1')
  const outOfBandRecord = await recipient.didcomm.oob.createInvitation({ label: 'recipient' })
  const recipientSide = nextEvent(
    recipient,
    DidCommConnectionEventTypes.DidCommConnectionStateChanged,
    (e) =>
      e.payload.connectionRecord.outOfBandId === outOfBandRecord.id &&
      e.payload.connectionRecord.state === DidCommDidExchangeState.Completed,
    STEP_MS,
    "the recipient's side of the sender connection completed"
  )
  const { connectionRecord: toRecipient } = await sender.didcomm.oob.receiveInvitation(outOfBandRecord.outOfBandInvitation, {
    label: 'sender',
  })
  await sender.didcomm.connections.returnWhenIsConnected(toRecipient.id, { timeoutMs: STEP_MS })
  await recipientSide

  const live = Array.from({ length: 5 }, (_, i) => `live-${i + 1}`)
  for (const text of live) await sender.didcomm.basicMessages.sendMessage(toRecipient.id, text)
  await received.waitFor(live, STEP_MS, 'the live messages')
  assert.equal(deliveredBy(m1), 0, 'mediator 1 holds no live session and must not deliver')
  assert.ok(deliveredBy(m2) >= live.length, `mediator 2 delivered ${deliveredBy(m2)} messages from MPR`)

  // 4. the recipient goes offline; messages queue; mediator 1 restarts meanwhile
  await recipient.didcomm.mediationRecipient.stopMessagePickup()
  assert.equal(lb.drop('m2'), 1, "the recipient's live socket to mediator 2")
  await m2.waitFor(
    (l) => l.event === 'liveSession' && l.action === 'removed' && l.connectionId === mprConnectionId,
    STEP_MS,
    'the live session removed'
  )
  await eventually(
    () => probe.call('getLiveSession', { connectionId: mprConnectionId }),
    (v) => v === false,
    STEP_MS,
    'the live session gone from MPR'
  )
  const offline1 = Array.from({ length: 4 }, (_, i) => `offline-a-${i + 1}`)
  for (const text of offline1) await sender.didcomm.basicMessages.sendMessage(toRecipient.id, text)
  await eventually(() => probe.count(mprConnectionId), (n) => n === offline1.length, STEP_MS, 'queued in MPR')

  await m1.stop()
  await m1.start()
  const offline2 = Array.from({ length: 4 }, (_, i) => `offline-b-${i + 1}`)
  for (const text of offline2) await sender.didcomm.basicMessages.sendMessage(toRecipient.id, text)
  const offline = [...offline1, ...offline2]
  await eventually(() => probe.count(mprConnectionId), (n) => n === offline.length, STEP_MS, 'queued in MPR')
  assert.deepEqual(
    offline.filter((text) => received.counts.has(text)),
    [],
    'nothing reaches an offline recipient'
  )

  // 5. the recipient returns and polls (Pickup v2, batches of 3) through the restarted mediator 1
  await recipient.didcomm.mediationRecipient.initiateMessagePickup(mediation, DidCommMediatorPickupStrategy.PickUpV2)
  await received.waitFor(offline, STEP_MS, 'the queued messages')
  await eventually(() => probe.count(mprConnectionId), (n) => n === 0, STEP_MS, 'MPR queue drained')
  await recipient.didcomm.mediationRecipient.stopMessagePickup()

  const expected = [...live, ...offline]
  assert.deepEqual(
    [...received.counts.entries()].sort(),
    expected.map((text) => [text, 1]).sort(),
    `every message exactly once${diagnostics()}`
  )
  if (process.env.MPR_E2E_RESULT) {
    await writeFile(process.env.MPR_E2E_RESULT, JSON.stringify({ connectionId: mprConnectionId, messages: expected }))
  }
})
