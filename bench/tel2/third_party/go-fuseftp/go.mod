// Stand-in for github.com/telepresenceio/go-fuseftp v1.0.1, which the Go
// module proxy does not serve. Only the linked_fuseftp build imports its
// packages; the external_fuseftp build needs nothing but this go.mod.
module github.com/telepresenceio/go-fuseftp

go 1.25
