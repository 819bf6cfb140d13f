// Building blocks of the real Credo 0.6 agents the tests run: mediators (separate processes,
// mediator.mjs), a recipient and a sender. Test code only; the package itself is ../../build.
import '@openwallet-foundation/askar-nodejs' // before @credo-ts/askar (registers the native library)
import { askar } from '@openwallet-foundation/askar-nodejs'
import { AskarModule } from '@credo-ts/askar'
import { Agent, ConsoleLogger, LogLevel } from '@credo-ts/core'
import { DidCommModule, DidCommWsOutboundTransport } from '@credo-ts/didcomm'
import { agentDependencies, DidCommWsInboundTransport } from '@credo-ts/node'
import { WebSocketServer } from 'ws'

export const LOG_LEVEL = process.env.CREDO_LOG_LEVEL ? LogLevel[process.env.CREDO_LOG_LEVEL] : LogLevel.off

/** A WebSocket inbound transport listening on 127.0.0.1:port only. */
export function loopbackWsInbound(port) {
  return new DidCommWsInboundTransport({ server: new WebSocketServer({ host: '127.0.0.1', port }) })
}

/**
 * An agent with an Askar store (SQLite file at `storePath`, or in memory) and DIDComm over
 * WebSockets. `didcomm` is merged into the DidCommModule options.
 */
export function makeAgent({ label, storeId, storeKey, storePath, didcomm, logger }) {
  const database = storePath
    ? { type: 'sqlite', config: { path: storePath } }
    : { type: 'sqlite', config: { inMemory: true } }
  return new Agent({
    config: { label, logger: logger ?? new ConsoleLogger(LOG_LEVEL), autoUpdateStorageOnStartup: true },
    dependencies: agentDependencies,
    modules: {
      askar: new AskarModule({
        askar,
        store: { id: storeId, key: storeKey ?? 'mpr-test-store-key', keyDerivationMethod: 'raw', database },
      }),
      didcomm: new DidCommModule({
        ...didcomm,
        transports: {
          inbound: didcomm.inbound ?? [],
          outbound: [new DidCommWsOutboundTransport()],
        },
      }),
    },
  })
}
