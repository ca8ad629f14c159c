# FuckBase server image: `docker build -t fuckbase .` then `docker run -p 8080:8080 -v fb:/data fuckbase`
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir '.[server]' && useradd --system --home /data fuckbase && mkdir -p /data && chown fuckbase /data
USER fuckbase
VOLUME /data
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health')"
ENTRYPOINT ["fuckbase"]
CMD ["--host", "0.0.0.0", "--port", "8080", "--data-dir", "/data"]
