from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

CHECK: ReqType
CPUINFO_CHECK: ReqType
CPUINFO_DUMP: ReqType
DESCRIPTOR: _descriptor.FileDescriptor
DUMP: ReqType
EMPTY: ReqType
FEATURE_CHECK: ReqType
IPTABLES: NetworkLockMethod
NFTABLES: NetworkLockMethod
NOTIFY: ReqType
PAGE_SERVER: ReqType
PAGE_SERVER_CHLD: ReqType
PRE_DUMP: ReqType
RESTORE: ReqType
SINGLE_PRE_DUMP: ReqType
SKIP: NetworkLockMethod
VERSION: ReqType
WAIT_PID: ReqType

class DumpResp(_message.Message):
    __slots__ = ["restored"]
    RESTORED_FIELD_NUMBER: _ClassVar[int]
    restored: bool
    def __init__(self, restored: bool = ...) -> None: ...

class Features(_message.Message):
    __slots__ = ["lazy_pages", "mem_track", "pidfd_store"]
    LAZY_PAGES_FIELD_NUMBER: _ClassVar[int]
    MEM_TRACK_FIELD_NUMBER: _ClassVar[int]
    PIDFD_STORE_FIELD_NUMBER: _ClassVar[int]
    lazy_pages: bool
    mem_track: bool
    pidfd_store: bool
    def __init__(self, mem_track: bool = ..., lazy_pages: bool = ..., pidfd_store: bool = ...) -> None: ...

class InheritFd(_message.Message):
    __slots__ = ["fd", "key"]
    FD_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    fd: int
    key: str
    def __init__(self, key: _Optional[str] = ..., fd: _Optional[int] = ...) -> None: ...

class Notify(_message.Message):
    __slots__ = ["pid", "script"]
    PID_FIELD_NUMBER: _ClassVar[int]
    SCRIPT_FIELD_NUMBER: _ClassVar[int]
    pid: int
    script: str
    def __init__(self, script: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...

class Opts(_message.Message):
    __slots__ = ["ext_unix_sk", "external", "file_locks", "images_dir", "images_dir_fd", "inherit_fd", "lazy_pages", "leave_running", "leave_stopped", "link_remap", "log_file", "log_level", "network_lock", "notify_scripts", "pid", "ps", "root", "rst_sibling", "shell_job", "tcp_close", "tcp_established", "timeout", "work_dir_fd"]
    EXTERNAL_FIELD_NUMBER: _ClassVar[int]
    EXT_UNIX_SK_FIELD_NUMBER: _ClassVar[int]
    FILE_LOCKS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_DIR_FD_FIELD_NUMBER: _ClassVar[int]
    IMAGES_DIR_FIELD_NUMBER: _ClassVar[int]
    INHERIT_FD_FIELD_NUMBER: _ClassVar[int]
    LAZY_PAGES_FIELD_NUMBER: _ClassVar[int]
    LEAVE_RUNNING_FIELD_NUMBER: _ClassVar[int]
    LEAVE_STOPPED_FIELD_NUMBER: _ClassVar[int]
    LINK_REMAP_FIELD_NUMBER: _ClassVar[int]
    LOG_FILE_FIELD_NUMBER: _ClassVar[int]
    LOG_LEVEL_FIELD_NUMBER: _ClassVar[int]
    NETWORK_LOCK_FIELD_NUMBER: _ClassVar[int]
    NOTIFY_SCRIPTS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    PS_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    RST_SIBLING_FIELD_NUMBER: _ClassVar[int]
    SHELL_JOB_FIELD_NUMBER: _ClassVar[int]
    TCP_CLOSE_FIELD_NUMBER: _ClassVar[int]
    TCP_ESTABLISHED_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    WORK_DIR_FD_FIELD_NUMBER: _ClassVar[int]
    ext_unix_sk: bool
    external: _containers.RepeatedScalarFieldContainer[str]
    file_locks: bool
    images_dir: str
    images_dir_fd: int
    inherit_fd: _containers.RepeatedCompositeFieldContainer[InheritFd]
    lazy_pages: bool
    leave_running: bool
    leave_stopped: bool
    link_remap: bool
    log_file: str
    log_level: int
    network_lock: NetworkLockMethod
    notify_scripts: bool
    pid: int
    ps: PageServerInfo
    root: str
    rst_sibling: bool
    shell_job: bool
    tcp_close: bool
    tcp_established: bool
    timeout: int
    work_dir_fd: int
    def __init__(self, images_dir_fd: _Optional[int] = ..., images_dir: _Optional[str] = ..., pid: _Optional[int] = ..., leave_running: bool = ..., ext_unix_sk: bool = ..., tcp_established: bool = ..., shell_job: bool = ..., file_locks: bool = ..., log_level: _Optional[int] = ..., log_file: _Optional[str] = ..., ps: _Optional[_Union[PageServerInfo, _Mapping]] = ..., notify_scripts: bool = ..., root: _Optional[str] = ..., work_dir_fd: _Optional[int] = ..., link_remap: bool = ..., rst_sibling: bool = ..., inherit_fd: _Optional[_Iterable[_Union[InheritFd, _Mapping]]] = ..., external: _Optional[_Iterable[str]] = ..., timeout: _Optional[int] = ..., lazy_pages: bool = ..., tcp_close: bool = ..., network_lock: _Optional[_Union[NetworkLockMethod, str]] = ..., leave_stopped: bool = ...) -> None: ...

class PageServerInfo(_message.Message):
    __slots__ = ["address", "fd", "pid", "port"]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    FD_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    address: str
    fd: int
    pid: int
    port: int
    def __init__(self, address: _Optional[str] = ..., port: _Optional[int] = ..., pid: _Optional[int] = ..., fd: _Optional[int] = ...) -> None: ...

class Req(_message.Message):
    __slots__ = ["features", "keep_open", "notify_success", "opts", "pid", "type"]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    KEEP_OPEN_FIELD_NUMBER: _ClassVar[int]
    NOTIFY_SUCCESS_FIELD_NUMBER: _ClassVar[int]
    OPTS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    features: Features
    keep_open: bool
    notify_success: bool
    opts: Opts
    pid: int
    type: ReqType
    def __init__(self, type: _Optional[_Union[ReqType, str]] = ..., opts: _Optional[_Union[Opts, _Mapping]] = ..., notify_success: bool = ..., keep_open: bool = ..., features: _Optional[_Union[Features, _Mapping]] = ..., pid: _Optional[int] = ...) -> None: ...

class Resp(_message.Message):
    __slots__ = ["cr_errmsg", "cr_errno", "dump", "features", "notify", "ps", "restore", "status", "success", "type", "version"]
    CR_ERRMSG_FIELD_NUMBER: _ClassVar[int]
    CR_ERRNO_FIELD_NUMBER: _ClassVar[int]
    DUMP_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    NOTIFY_FIELD_NUMBER: _ClassVar[int]
    PS_FIELD_NUMBER: _ClassVar[int]
    RESTORE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    cr_errmsg: str
    cr_errno: int
    dump: DumpResp
    features: Features
    notify: Notify
    ps: PageServerInfo
    restore: RestoreResp
    status: int
    success: bool
    type: ReqType
    version: Version
    def __init__(self, type: _Optional[_Union[ReqType, str]] = ..., success: bool = ..., dump: _Optional[_Union[DumpResp, _Mapping]] = ..., restore: _Optional[_Union[RestoreResp, _Mapping]] = ..., notify: _Optional[_Union[Notify, _Mapping]] = ..., ps: _Optional[_Union[PageServerInfo, _Mapping]] = ..., cr_errno: _Optional[int] = ..., features: _Optional[_Union[Features, _Mapping]] = ..., cr_errmsg: _Optional[str] = ..., version: _Optional[_Union[Version, _Mapping]] = ..., status: _Optional[int] = ...) -> None: ...

class RestoreResp(_message.Message):
    __slots__ = ["pid"]
    PID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    def __init__(self, pid: _Optional[int] = ...) -> None: ...

class Version(_message.Message):
    __slots__ = ["extra", "gitid", "major_number", "minor_number", "name", "sublevel"]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    GITID_FIELD_NUMBER: _ClassVar[int]
    MAJOR_NUMBER_FIELD_NUMBER: _ClassVar[int]
    MINOR_NUMBER_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SUBLEVEL_FIELD_NUMBER: _ClassVar[int]
    extra: int
    gitid: str
    major_number: int
    minor_number: int
    name: str
    sublevel: int
    def __init__(self, major_number: _Optional[int] = ..., minor_number: _Optional[int] = ..., gitid: _Optional[str] = ..., sublevel: _Optional[int] = ..., extra: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class NetworkLockMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []

class ReqType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []
