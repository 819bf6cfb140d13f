// A Credo 0.6 mediator process using MprQueueTransportRepository, the way an operator would
// (see README.md): QueueOnly forwarding, live sessions wired with attach(agent).
//
// Environment: MEDIATOR_LABEL, MEDIATOR_PORT (WebSocket inbound, 127.0.0.1), MEDIATOR_ENDPOINT
// (the advertised endpoint: the load balancer in front of all instances), STORE_ID, STORE_KEY,
// STORE_PATH (one SQLite store shared by every instance), MPR_URL, MPR_SOCKET_ID,
// CREATE_INVITATION=1 (print an out-of-band invitation URL once ready).
//
// Prints one JSON object per line on stdout: {event: "ready", invitationUrl?},
// {event: "connection", connectionId, theirLabel, state}, {event: "liveSession", action,
// connectionId}, {event: "mpr", level, message, data} (the package's log), {event: "stopped"}.
// SIGTERM: close the repository, shut the agent down, exit 0.
import { DidCommConnectionEventTypes, DidCommMessageForwardingStrategy, DidCommMessagePickupEventTypes } from '@credo-ts/didcomm'

import { MprQueueTransportRepository } from '../../build/index.js'
import { loopbackWsInbound, makeAgent } from './credo.mjs'

const env = process.env
const emit = (event) => process.stdout.write(`${JSON.stringify(event)}\n`)

const mprLogger = {
  debug: (message, data) => emit({ event: 'mpr', level: 'debug', message, data }),
  info: (message, data) => emit({ event: 'mpr', level: 'info', message, data }),
  warn: (message, data) => emit({ event: 'mpr', level: 'warn', message, data }),
  error: (message, data) => emit({ event: 'mpr', level: 'error', message, data }),
}

// --- the lines a mediator needs (README) ---
const queueTransportRepository = new MprQueueTransportRepository({
  url: env.MPR_URL,
  socketId: env.MPR_SOCKET_ID,
  logger: mprLogger,
  reconnect: { initialDelayMs: 100, maxDelayMs: 1000 },
})
const agent = makeAgent({
  label: env.MEDIATOR_LABEL,
  storeId: env.STORE_ID,
  storeKey: env.STORE_KEY,
  storePath: env.STORE_PATH,
  didcomm: {
    endpoints: [env.MEDIATOR_ENDPOINT],
    inbound: [loopbackWsInbound(Number(env.MEDIATOR_PORT))],
    queueTransportRepository,
    connections: { autoAcceptConnections: true },
    mediator: {
      autoAcceptMediationRequests: true,
      messageForwardingStrategy: DidCommMessageForwardingStrategy.QueueOnly,
    },
  },
})

agent.events.on(DidCommConnectionEventTypes.DidCommConnectionStateChanged, ({ payload }) => {
  const record = payload.connectionRecord
  emit({ event: 'connection', connectionId: record.id, theirLabel: record.theirLabel, state: record.state })
})
for (const [type, action] of [
  [DidCommMessagePickupEventTypes.LiveSessionSaved, 'saved'],
  [DidCommMessagePickupEventTypes.LiveSessionRemoved, 'removed'],
]) {
  agent.events.on(type, ({ payload }) => emit({ event: 'liveSession', action, connectionId: payload.session.connectionId }))
}

let stopping = false
process.on('SIGTERM', async () => {
  if (stopping) return
  stopping = true
  try {
    await queueTransportRepository.close()
    await agent.shutdown()
  } finally {
    emit({ event: 'stopped' })
    process.exit(0)
  }
})

await agent.initialize()
await queueTransportRepository.attach(agent)
let invitationUrl
if (env.CREATE_INVITATION === '1') {
  const { outOfBandInvitation } = await agent.didcomm.oob.createInvitation({ multiUseInvitation: true })
  invitationUrl = outOfBandInvitation.toUrl({ domain: 'https://mediator.invalid' })
}
emit({ event: 'ready', invitationUrl })
