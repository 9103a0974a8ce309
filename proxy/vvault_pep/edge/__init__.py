"""The PEP's sockets: the mTLS listener, the upstream forwarder and its HTTP/1.1 client, and
the managed OPA process."""
