# The MPR server image: twistd -n mpr, configured by the environment variables of the README's
# configuration table. Build: docker build -t mpr-server .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPR_DATA_DIR=/data

WORKDIR /src
COPY setup.py setup.cfg constraints.txt README.rst ./
COPY mpr_server ./mpr_server
COPY twisted ./twisted
# The twistd plugin cache is written at build time: the installed tree is read-only at run time.
RUN pip install -c constraints.txt . \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && twistd --help > /dev/null \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin mpr \
    && mkdir -p /data && chown mpr /data \
    && rm -rf /src

USER mpr
WORKDIR /data
VOLUME ["/data"]
EXPOSE 3100 3500

HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('APP_PORT', '3500') + '/ready', timeout=2)"]

ENTRYPOINT ["twistd", "-n", "--pidfile=", "mpr"]
