"""How the kernel picks the worker of `ocigate --workers N` for a new connection, all workers listening on one address
with SO_REUSEPORT: by default by a hash of the connection's addresses and ports, so that one client's connections
spread over every worker; with client affinity, by the client's address alone, so that every connection of a client
meets the same worker (and the pull context it keeps).

Client affinity is a classic BPF program attached to the listening socket (SO_ATTACH_REUSEPORT_CBPF): the last 32
bits of the source address, modulo N, pick the socket of the group. A number the group has no socket for (worker 0
alone at the start, a worker being started again) makes the kernel fall back to its hash.
"""

import ctypes
import socket
from typing import Literal

AFFINITIES = ("connection", "client")
Affinity = Literal["connection", "client"]

SO_ATTACH_REUSEPORT_CBPF = 51  # asm-generic/socket.h
_SKF_NET_OFF = -0x100000  # linux/filter.h: loads relative to the network (IP) header
# Where the last 32 bits of the source address are in the IP header.
_SOURCE_WORD = {socket.AF_INET: 12, socket.AF_INET6: 8 + 12}
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_ALU_MOD_K = 0x94  # BPF_ALU | BPF_MOD | BPF_K
_RET_A = 0x16  # BPF_RET | BPF_A


class _Instruction(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Instruction))]


def by_client(family: socket.AddressFamily, count: int) -> list[tuple[int, int, int, int]]:
    """The program, as (code, jt, jf, k) instructions: the socket for a client of `family` is its address modulo
    `count`."""
    offset = (_SKF_NET_OFF + _SOURCE_WORD[family]) & 0xFFFFFFFF
    return [(_LD_W_ABS, 0, 0, offset), (_ALU_MOD_K, 0, 0, count), (_RET_A, 0, 0, 0)]


def keep_clients_together(sock: socket.socket, count: int) -> None:
    """Makes the kernel give every connection of one client address to the same socket of the SO_REUSEPORT group
    `sock` is in (of `count` sockets); OSError when it cannot."""
    instructions = by_client(sock.family, count)
    array = (_Instruction * len(instructions))(*(_Instruction(*instruction) for instruction in instructions))
    program = _Program(len(instructions), array)
    # The kernel copies the instructions during the call; `array` lives until it returns.
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(program))
