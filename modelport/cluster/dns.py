"""``modelport dns``: the member directory as DNS SRV records, for tools that speak DNS.

An authoritative server for ``<cluster>.<domain>.`` (packets encoded and decoded by ``dnslib``),
following the member directory by watch, so an answer is at most one change old:

    _modelport._tcp.<cluster>.<domain>          SRV  every ready worker's HTTP port
    _modelport-zmq._tcp.<cluster>.<domain>      SRV  every ready worker's ZeroMQ port
    _modelport._tcp.<model>.<cluster>.<domain>  SRV  the ready workers that serve <model>
    <member id>.<cluster>.<domain>              A / AAAA  a worker's address (SRV targets)

Draining workers are left out. Answers carry a short TTL (``ttl_s``, 1 s), so resolvers such as
HAProxy's (``server-template ... resolvers``) follow workers joining and leaving. Unknown names
get NXDOMAIN; packets that do not parse are dropped; over UDP, answers too big for the client's
UDP size are sent truncated (TC), and the client asks again over TCP on the same port.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

from modelport.cluster.members import DRAINING, ClusterURL, Directory, Member

logger = logging.getLogger("modelport.dns")

HTTP_SERVICE, ZMQ_SERVICE = "_modelport._tcp", "_modelport-zmq._tcp"


def dns_library():
    try:
        import dnslib
    except ImportError:
        from modelport.errors import MissingExtra

        raise MissingExtra("modelport dns needs dnslib: pip install 'modelport[cluster]'") from None
    return dnslib


def _label(text: str) -> bool:
    return 0 < len(text) <= 63 and all(c.isalnum() or c == "-" for c in text) and text.isascii()


class Zone:
    """The records for one cluster, rebuilt from the members on every change of the directory."""

    def __init__(self, cluster: ClusterURL, *, domain: str = "modelport", ttl_s: int = 1) -> None:
        self.dnslib = dns_library()
        self.origin = f"{cluster.name}.{domain.strip('.')}."
        self.ttl_s = ttl_s
        self.records: dict[str, list] = {}  # lower-case name -> resource records

    def update(self, members: dict[str, Member]) -> None:
        d = self.dnslib
        records: dict[str, list] = {}

        def add(name: str, rtype: int, rdata) -> None:
            records.setdefault(name.lower(), []).append(d.RR(name, rtype, rdata=rdata, ttl=self.ttl_s))

        for member in members.values():
            if member.state == DRAINING:
                continue
            target = self._target(member, add)
            add(f"{HTTP_SERVICE}.{self.origin}", d.QTYPE.SRV, d.SRV(10, 10, member.http_port, target))
            if member.zmq:
                port = int(member.zmq.rsplit(":", 1)[1])
                add(f"{ZMQ_SERVICE}.{self.origin}", d.QTYPE.SRV, d.SRV(10, 10, port, target))
            for model, info in member.models.items():
                if _label(model) and info.get("versions"):
                    add(f"{HTTP_SERVICE}.{model}.{self.origin}", d.QTYPE.SRV, d.SRV(10, 10, member.http_port, target))
        self.records = records

    def _target(self, member: Member, add) -> str:
        """The SRV target: a name of ours with the worker's address, or the worker's own host name."""
        d = self.dnslib
        host = member.http_host
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return host if host.endswith(".") else host + "."  # its own name: resolvable elsewhere
        name = f"{member.id}.{self.origin}"
        if address.version == 4:
            add(name, d.QTYPE.A, d.A(str(address)))
        else:
            add(name, d.QTYPE.AAAA, d.AAAA(str(address)))
        return name

    def answer(self, data: bytes, max_size: int | None = None) -> bytes | None:
        """A reply to one query packet, or None for a packet that is not a DNS query.
        ``max_size``: the transport's limit (TCP: 65535); None: the UDP size the query allows."""
        d = self.dnslib
        try:
            request = d.DNSRecord.parse(data)
        except Exception:  # dnslib raises several types for malformed packets
            return None
        if request.header.qr or len(request.questions) != 1:
            return None
        question = request.q
        reply = request.reply()  # copies id and question; sets qr, aa and ra
        reply.header.ra = 0
        records = self.records.get(str(question.qname).lower())
        if records is None:
            reply.header.rcode = d.RCODE.NXDOMAIN
        else:
            for rr in records:
                if question.qtype in (rr.rtype, d.QTYPE.ANY):
                    reply.add_answer(rr)
                    if rr.rtype == d.QTYPE.SRV:  # the targets' addresses, so no second query is needed
                        for extra in self.records.get(str(rr.rdata.target).lower(), []):
                            reply.add_ar(extra)
        packet = reply.pack()
        if len(packet) > (max_size or self._udp_size(request)):
            packet = reply.truncate().pack()
        return bytes(packet)

    def _udp_size(self, request) -> int:
        for rr in request.ar:
            if rr.rtype == self.dnslib.QTYPE.OPT:
                return max(512, min(int(rr.rclass), 65535))
        return 512


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        reply = self.zone.answer(data)
        if reply is None:
            logger.debug("dropped a packet from %s that is not a DNS query", addr)
            return
        self.transport.sendto(reply, addr)


async def _serve_tcp_client(zone: Zone, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """DNS over TCP: each message is preceded by its 2-byte length; several may share a connection."""
    try:
        while True:
            size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 10), "big")
            reply = zone.answer(await asyncio.wait_for(reader.readexactly(size), 10), max_size=65535)
            if reply is None:
                break  # not DNS: close the connection
            writer.write(len(reply).to_bytes(2, "big") + reply)
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
        pass  # the client is done, or gave up
    finally:
        writer.close()


async def serve_dns(cluster: ClusterURL, *, host: str, port: int, domain: str = "modelport", ttl_s: int = 1) -> None:
    """Answer DNS over UDP and TCP on ``host:port`` until cancelled."""
    zone = Zone(cluster, domain=domain, ttl_s=ttl_s)
    directory = Directory(cluster, on_change=zone.update)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(zone), local_addr=(host, port))
    tcp = await asyncio.start_server(lambda r, w: _serve_tcp_client(zone, r, w), host, port)
    logger.info("DNS for %s on %s:%d (udp, tcp): SRV %s.%s", cluster, host, port, HTTP_SERVICE, zone.origin)
    try:
        await directory.run()
    finally:
        transport.close()
        tcp.close()
        await directory.close()
