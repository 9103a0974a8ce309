"""Clients the PEP speaks HTTP with: the lean HTTP/1.1 client (``http1``) that forwards to
upstreams and asks OPA for decisions, its answers parsed by llhttp; and the bounded whole
read (``bounded``) of the control-plane documents fetched with aiohttp's client."""
