"""zenmux-emit: the application side of zenmux-exporter, standard library only.

`zenmux_emit.emit` sends generation ids (UDP or a JSON-lines file); `zenmux_emit.hooks` captures them from the
openai, anthropic and google-genai SDKs' HTTP clients.
"""
