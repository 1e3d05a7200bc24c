from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CoreEntry(_message.Message):
    __slots__ = ["ids", "mtype", "tc"]
    IDS_FIELD_NUMBER: _ClassVar[int]
    MTYPE_FIELD_NUMBER: _ClassVar[int]
    TC_FIELD_NUMBER: _ClassVar[int]
    ids: TaskKobjIdsEntry
    mtype: int
    tc: TaskCoreEntry
    def __init__(self, mtype: _Optional[int] = ..., tc: _Optional[_Union[TaskCoreEntry, _Mapping]] = ..., ids: _Optional[_Union[TaskKobjIdsEntry, _Mapping]] = ...) -> None: ...

class FdinfoEntry(_message.Message):
    __slots__ = ["fd", "flags", "id", "type"]
    FD_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    fd: int
    flags: int
    id: int
    type: int
    def __init__(self, id: _Optional[int] = ..., flags: _Optional[int] = ..., type: _Optional[int] = ..., fd: _Optional[int] = ...) -> None: ...

class FifoEntry(_message.Message):
    __slots__ = ["id", "pipe_id", "regf_id"]
    ID_FIELD_NUMBER: _ClassVar[int]
    PIPE_ID_FIELD_NUMBER: _ClassVar[int]
    REGF_ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    pipe_id: int
    regf_id: int
    def __init__(self, id: _Optional[int] = ..., pipe_id: _Optional[int] = ..., regf_id: _Optional[int] = ...) -> None: ...

class FileEntry(_message.Message):
    __slots__ = ["fifo", "id", "isk", "pipe", "reg", "tty", "type", "usk"]
    FIFO_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    ISK_FIELD_NUMBER: _ClassVar[int]
    PIPE_FIELD_NUMBER: _ClassVar[int]
    REG_FIELD_NUMBER: _ClassVar[int]
    TTY_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    USK_FIELD_NUMBER: _ClassVar[int]
    fifo: FifoEntry
    id: int
    isk: InetSkEntry
    pipe: PipeEntry
    reg: RegFileEntry
    tty: TtyFileEntry
    type: int
    usk: UnixSkEntry
    def __init__(self, type: _Optional[int] = ..., id: _Optional[int] = ..., reg: _Optional[_Union[RegFileEntry, _Mapping]] = ..., isk: _Optional[_Union[InetSkEntry, _Mapping]] = ..., usk: _Optional[_Union[UnixSkEntry, _Mapping]] = ..., fifo: _Optional[_Union[FifoEntry, _Mapping]] = ..., pipe: _Optional[_Union[PipeEntry, _Mapping]] = ..., tty: _Optional[_Union[TtyFileEntry, _Mapping]] = ...) -> None: ...

class InetSkEntry(_message.Message):
    __slots__ = ["backlog", "dst_addr", "dst_port", "family", "id", "ino", "proto", "src_addr", "src_port", "state", "type"]
    BACKLOG_FIELD_NUMBER: _ClassVar[int]
    DST_ADDR_FIELD_NUMBER: _ClassVar[int]
    DST_PORT_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    INO_FIELD_NUMBER: _ClassVar[int]
    PROTO_FIELD_NUMBER: _ClassVar[int]
    SRC_ADDR_FIELD_NUMBER: _ClassVar[int]
    SRC_PORT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    backlog: int
    dst_addr: _containers.RepeatedScalarFieldContainer[int]
    dst_port: int
    family: int
    id: int
    ino: int
    proto: int
    src_addr: _containers.RepeatedScalarFieldContainer[int]
    src_port: int
    state: int
    type: int
    def __init__(self, id: _Optional[int] = ..., ino: _Optional[int] = ..., family: _Optional[int] = ..., type: _Optional[int] = ..., proto: _Optional[int] = ..., state: _Optional[int] = ..., src_port: _Optional[int] = ..., dst_port: _Optional[int] = ..., backlog: _Optional[int] = ..., src_addr: _Optional[_Iterable[int]] = ..., dst_addr: _Optional[_Iterable[int]] = ...) -> None: ...

class MmEntry(_message.Message):
    __slots__ = ["exe_file_id", "vmas"]
    EXE_FILE_ID_FIELD_NUMBER: _ClassVar[int]
    VMAS_FIELD_NUMBER: _ClassVar[int]
    exe_file_id: int
    vmas: _containers.RepeatedCompositeFieldContainer[VmaEntry]
    def __init__(self, exe_file_id: _Optional[int] = ..., vmas: _Optional[_Iterable[_Union[VmaEntry, _Mapping]]] = ...) -> None: ...

class PagemapEntry(_message.Message):
    __slots__ = ["compat_nr_pages", "flags", "in_parent", "nr_pages", "vaddr"]
    COMPAT_NR_PAGES_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    IN_PARENT_FIELD_NUMBER: _ClassVar[int]
    NR_PAGES_FIELD_NUMBER: _ClassVar[int]
    VADDR_FIELD_NUMBER: _ClassVar[int]
    compat_nr_pages: int
    flags: int
    in_parent: bool
    nr_pages: int
    vaddr: int
    def __init__(self, vaddr: _Optional[int] = ..., compat_nr_pages: _Optional[int] = ..., in_parent: bool = ..., flags: _Optional[int] = ..., nr_pages: _Optional[int] = ...) -> None: ...

class PagemapHead(_message.Message):
    __slots__ = ["pages_id"]
    PAGES_ID_FIELD_NUMBER: _ClassVar[int]
    pages_id: int
    def __init__(self, pages_id: _Optional[int] = ...) -> None: ...

class PipeEntry(_message.Message):
    __slots__ = ["flags", "id", "pipe_id"]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    PIPE_ID_FIELD_NUMBER: _ClassVar[int]
    flags: int
    id: int
    pipe_id: int
    def __init__(self, id: _Optional[int] = ..., pipe_id: _Optional[int] = ..., flags: _Optional[int] = ...) -> None: ...

class PstreeEntry(_message.Message):
    __slots__ = ["pgid", "pid", "ppid", "sid", "threads"]
    PGID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    PPID_FIELD_NUMBER: _ClassVar[int]
    SID_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    pgid: int
    pid: int
    ppid: int
    sid: int
    threads: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, pid: _Optional[int] = ..., ppid: _Optional[int] = ..., pgid: _Optional[int] = ..., sid: _Optional[int] = ..., threads: _Optional[_Iterable[int]] = ...) -> None: ...

class RegFileEntry(_message.Message):
    __slots__ = ["flags", "id", "mode", "name", "pos", "size"]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    POS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    flags: int
    id: int
    mode: int
    name: str
    pos: int
    size: int
    def __init__(self, id: _Optional[int] = ..., flags: _Optional[int] = ..., pos: _Optional[int] = ..., name: _Optional[str] = ..., size: _Optional[int] = ..., mode: _Optional[int] = ...) -> None: ...

class TaskCoreEntry(_message.Message):
    __slots__ = ["comm", "exit_code", "task_state"]
    COMM_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    TASK_STATE_FIELD_NUMBER: _ClassVar[int]
    comm: str
    exit_code: int
    task_state: int
    def __init__(self, task_state: _Optional[int] = ..., exit_code: _Optional[int] = ..., comm: _Optional[str] = ...) -> None: ...

class TaskKobjIdsEntry(_message.Message):
    __slots__ = ["files_id"]
    FILES_ID_FIELD_NUMBER: _ClassVar[int]
    files_id: int
    def __init__(self, files_id: _Optional[int] = ...) -> None: ...

class TcpStreamEntry(_message.Message):
    __slots__ = ["inq_len", "inq_seq", "outq_len", "outq_seq"]
    INQ_LEN_FIELD_NUMBER: _ClassVar[int]
    INQ_SEQ_FIELD_NUMBER: _ClassVar[int]
    OUTQ_LEN_FIELD_NUMBER: _ClassVar[int]
    OUTQ_SEQ_FIELD_NUMBER: _ClassVar[int]
    inq_len: int
    inq_seq: int
    outq_len: int
    outq_seq: int
    def __init__(self, inq_len: _Optional[int] = ..., inq_seq: _Optional[int] = ..., outq_len: _Optional[int] = ..., outq_seq: _Optional[int] = ...) -> None: ...

class TtyFileEntry(_message.Message):
    __slots__ = ["flags", "id", "regf_id", "tty_info_id"]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    REGF_ID_FIELD_NUMBER: _ClassVar[int]
    TTY_INFO_ID_FIELD_NUMBER: _ClassVar[int]
    flags: int
    id: int
    regf_id: int
    tty_info_id: int
    def __init__(self, id: _Optional[int] = ..., tty_info_id: _Optional[int] = ..., flags: _Optional[int] = ..., regf_id: _Optional[int] = ...) -> None: ...

class UnixSkEntry(_message.Message):
    __slots__ = ["backlog", "id", "ino", "name", "peer", "state", "type"]
    BACKLOG_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    INO_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    backlog: int
    id: int
    ino: int
    name: bytes
    peer: int
    state: int
    type: int
    def __init__(self, id: _Optional[int] = ..., ino: _Optional[int] = ..., type: _Optional[int] = ..., state: _Optional[int] = ..., backlog: _Optional[int] = ..., peer: _Optional[int] = ..., name: _Optional[bytes] = ...) -> None: ...

class VmaEntry(_message.Message):
    __slots__ = ["end", "flags", "pgoff", "prot", "shmid", "start", "status"]
    END_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    PGOFF_FIELD_NUMBER: _ClassVar[int]
    PROT_FIELD_NUMBER: _ClassVar[int]
    SHMID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    end: int
    flags: int
    pgoff: int
    prot: int
    shmid: int
    start: int
    status: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., pgoff: _Optional[int] = ..., shmid: _Optional[int] = ..., prot: _Optional[int] = ..., flags: _Optional[int] = ..., status: _Optional[int] = ...) -> None: ...
