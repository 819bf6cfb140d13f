from twisted.application.service import ServiceMaker

mpr = ServiceMaker(
    "mpr-server",
    "mpr_server.tap",
    "Message Pickup Repository for DIDComm mediators (JSON-RPC over WebSocket)",
    "mpr",
)
