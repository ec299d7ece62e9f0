//! The `#[callbacks]` attribute of `nbdhost-plugin-api`, which re-exports
//! it; see `nbdhost_plugin_api::callbacks` for its documentation.

use proc_macro::TokenStream;
use quote::quote;
use syn::{parse_macro_input, ImplItem, ItemImpl};

/// Put on an `impl Plugin`, `impl Handle`, `impl Filter` or
/// `impl FilterHandle` block: adds the `CALLBACKS` constant naming every
/// method the block defines, so that the SDK registers only those with the
/// server and leaves the rest to the server's defaults.
#[proc_macro_attribute]
pub fn callbacks(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        let attr = proc_macro2::TokenStream::from(attr);
        return syn::Error::new_spanned(attr, "#[callbacks] takes no arguments")
            .to_compile_error()
            .into();
    }
    let mut block = parse_macro_input!(item as ItemImpl);
    if block.trait_.is_none() {
        return syn::Error::new_spanned(
            &block.self_ty,
            "#[callbacks] belongs on an `impl Plugin`, `impl Handle`, `impl Filter` or `impl FilterHandle` block",
        )
        .to_compile_error()
        .into();
    }
    let names: Vec<String> = block
        .items
        .iter()
        .filter_map(|item| match item {
            ImplItem::Fn(f) => Some(f.sig.ident.to_string()),
            _ => None,
        })
        .collect();
    block.items.push(syn::parse_quote! {
        const CALLBACKS: ::nbdhost_plugin_api::Callbacks =
            ::nbdhost_plugin_api::Callbacks::new(&[#(#names),*]);
    });
    quote!(#block).into()
}
