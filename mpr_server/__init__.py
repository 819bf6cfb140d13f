"""mpr-server: a Message Pickup Repository for horizontally scaled DIDComm mediators."""

__version__ = "0.1.0"
