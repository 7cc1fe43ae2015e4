"""The network: the libp2p host, admission and the gatekeeper that guards every Covey protocol,
and discovery (mDNS on the LAN, the DHT across networks)."""
