export {
  MprQueueTransportRepository,
  type AttachOptions,
  type MprPushNotificationToken,
  type MprQueueTransportRepositoryOptions,
  type PushTokenHook,
} from './MprQueueTransportRepository.js'
export type { MprLogger, ReconnectOptions } from './rpc.js'
export {
  MprConnectionLostError,
  MprError,
  MprNotConnectedError,
  MprProtocolError,
  MprRpcError,
  MprTimeoutError,
} from './errors.js'
