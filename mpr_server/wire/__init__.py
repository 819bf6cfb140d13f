"""The mediator-facing wire: JSON-RPC 2.0 over WebSocket, exactly as rpc-websockets 7.11.2 speaks it."""
