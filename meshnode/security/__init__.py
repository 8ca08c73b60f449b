"""The mesh CA and the certificate rules every process shares (clock, certs, tokens, bundle,
signer). Imports no agent, proxy or CLI module."""
